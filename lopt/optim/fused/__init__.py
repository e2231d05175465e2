"""The fast step for dense layers: :mod:`.dense` plans it (node tables
broadcast along rows and columns instead of gathered per edge) and
:mod:`.cpu_kernel` builds and loads the C kernel that runs it on CPU."""
