"""The neural graph follows the network, not the order of the param groups.

Training scripts group parameters by weight decay (nanoGPT, timm, Hugging Face):
every matrix first, every bias and norm gain last. ``NGOptimizer(groups,
model=m)`` and named parameters give the graph of ``m.parameters()`` whatever
the grouping; unnamed split groups without a model get a warning naming
``model=``.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lopt import NGOptimizer
from lopt.graph import NeuralGraph
from lopt.optim.optimizer import structure_order
from tests.optim.test_real_models import GPT

VOCAB, CONTEXT = 16, 8


def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(vocab=VOCAB, context=CONTEXT, dim=16, depth=2, heads=2)


def tokens(step: int) -> torch.Tensor:
    """8 sequences counting up by 3 (mod VOCAB) from random starts: learnable."""
    gen = torch.Generator().manual_seed(step)
    start = torch.randint(0, VOCAB, (8, 1), generator=gen)
    return (start + 3 * torch.arange(CONTEXT + 1)) % VOCAB


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


def run(model: nn.Module, opt: NGOptimizer, steps: int = 6, clip=None) -> list:
    losses = []
    for t in range(steps):
        opt.zero_grad()
        loss = lm_loss(model, tokens(t))
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(loss.item())
    return losses


def nanogpt_groups(model: nn.Module, weight_decay: float = 0.1) -> list[dict]:
    """nanoGPT's ``configure_optimizers``: tensors of 2+ dims decay, the rest
    do not (two unnamed groups, matrices first)."""
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def timm_groups(model: nn.Module, weight_decay: float = 0.1) -> list[dict]:
    """timm's ``param_groups_weight_decay``: 1-D tensors and biases do not
    decay and come first."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def same_graph(a: NGOptimizer, b: NGOptimizer, ma: nn.Module, mb=None) -> bool:
    """The two optimizers' graphs are one graph over the same tensors: equal
    structure, and at each position of the flat layout the same parameter
    (by its position in ``ma.parameters()``, ``mb.parameters()``), the same
    hidden matrices orthogonalised."""
    mb = ma if mb is None else mb
    ga, gb = a.graph, b.graph
    index_a = {id(p): i for i, p in enumerate(ma.parameters())}
    index_b = {id(p): i for i, p in enumerate(mb.parameters())}
    pa, pb = a._all_params(), b._all_params()
    return (
        ga.num_nodes == gb.num_nodes
        and torch.equal(ga.edge_index, gb.edge_index)
        and torch.equal(ga.slot_node, gb.slot_node)
        and torch.equal(ga.slot_type, gb.slot_type)
        and torch.equal(ga.node_attr, gb.node_attr)
        and [index_a[id(pa[i])] for i in ga.tensor_order]
        == [index_b[id(pb[j])] for j in gb.tensor_order]
        and [index_a[id(pa[i])] for i in a._ortho.indices]
        == [index_b[id(pb[j])] for j in b._ortho.indices]
    )


# --------------------------------------------------------------- model=
@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("grouping", ["nanogpt", "timm", "reversed", "shuffled"])
def test_groups_in_any_order_with_model_give_the_same_trajectory(grouping, fused):
    """Groups sharing hyperparameters, listed in any order, with ``model=``:
    the same parameters, bit for bit, as ``m.parameters()``."""
    ref_model = gpt()
    ref = NGOptimizer(ref_model.parameters(), model=ref_model, fused=fused)
    ref_losses = run(ref_model, ref)

    model = gpt()
    params = list(model.parameters())
    if grouping == "nanogpt":
        groups = nanogpt_groups(model, weight_decay=0.0)
    elif grouping == "timm":
        groups = timm_groups(model, weight_decay=0.0)
    elif grouping == "reversed":
        groups = [{"params": params[::-1]}]
    else:
        perm = torch.randperm(len(params), generator=torch.Generator().manual_seed(3))
        groups = [{"params": [params[i] for i in perm[:5]]}]
        groups.append({"params": [params[i] for i in perm[5:]]})
    opt = NGOptimizer(groups, model=model, fused=fused)
    assert run(model, opt) == ref_losses
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    assert same_graph(opt, ref, model, ref_model)


def test_model_order_is_the_order_of_model_parameters():
    """With the parameters in the model's order, ``model=`` changes nothing."""
    model = gpt()
    plain = NGOptimizer(model.parameters())
    with_model = NGOptimizer(model.parameters(), model=model)
    assert same_graph(plain, with_model, model)
    assert plain.graph.tensor_order == with_model.graph.tensor_order


def test_split_groups_with_model_give_the_graph_of_model_parameters():
    """nanoGPT-style and timm-style grouping, weight decay on: the graph of
    ``model.parameters()``, and decay reaches the decay group only."""
    model = gpt()
    plain = NGOptimizer(model.parameters())
    for groups in (nanogpt_groups(model), timm_groups(model)):
        opt = NGOptimizer(groups, model=model)
        assert same_graph(opt, plain, model)


def test_split_groups_without_model_warn_naming_model():
    model = gpt()
    opt = NGOptimizer(nanogpt_groups(model))
    with pytest.warns(UserWarning, match=r"Pass model=model") as record:
        run(model, opt, steps=2)
    assert sum("model=model" in str(w.message) for w in record) == 1
    assert not same_graph(opt, NGOptimizer(model.parameters()), model)  # wrong


@pytest.mark.parametrize(
    "make",
    [
        lambda m: NGOptimizer(m.parameters()),
        lambda m: NGOptimizer(nanogpt_groups(m), model=m),
        lambda m: NGOptimizer(m.named_parameters()),
        # Layer-wise groups in the network's order are no decay / no-decay
        # split (the head is tied to the embedding: its weight is there).
        lambda m: NGOptimizer(
            [{"params": list(c.parameters())} for c in m.children() if c is not m.head]
        ),
    ],
)
def test_no_warning_when_the_structure_can_be_trusted(make):
    model = gpt()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(model, make(model), steps=2)


def test_model_errors_name_the_problem():
    model = gpt()
    with pytest.raises(ValueError, match="Invalid model: expected a torch.nn.Module"):
        NGOptimizer(model.parameters(), model=[model])
    stray = nn.Parameter(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\(3, 4\): it is not a parameter of model"):
        NGOptimizer([*model.parameters(), stray], model=model)
    opt = NGOptimizer(model.parameters(), model=model)
    with pytest.raises(ValueError, match="not a parameter of model"):
        opt.add_param_group({"params": [stray]})


def test_state_dict_round_trip_with_model_and_groups():
    """Save with one grouping, reload into the same grouping: the trajectory
    goes on as if never interrupted."""
    model, twin = gpt(), gpt()
    opt = NGOptimizer(timm_groups(model), model=model)
    run(model, opt, steps=3)
    twin.load_state_dict(model.state_dict())
    other = NGOptimizer(timm_groups(twin), model=twin)
    other.load_state_dict(opt.state_dict())
    assert run(model, opt, steps=3) == run(twin, other, steps=3)


# ------------------------------------------------------- named parameters
def test_reversed_named_parameters_equal_in_order_ones():
    a, b = gpt(), gpt()
    losses_a = run(a, NGOptimizer(a.named_parameters()))
    losses_b = run(b, NGOptimizer(list(b.named_parameters())[::-1]))
    assert losses_a == losses_b
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_named_groups_give_the_graph_of_named_parameters():
    """Named decay / no-decay groups: the graph of the whole named list."""
    model = gpt()
    named = list(model.named_parameters())
    groups = [
        {"params": [(n, p) for n, p in named if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [(n, p) for n, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]
    assert same_graph(NGOptimizer(groups), NGOptimizer(model.named_parameters()), model)


def test_name_order_puts_a_layers_weight_before_its_bias():
    """Natural order of module paths (``10`` after ``2``), then weight, then
    bias: a plain MLP's names give its own order back."""
    net = nn.Sequential(*[nn.Linear(3, 3) for _ in range(12)])
    named = list(net.named_parameters())
    shuffled = [named[i] for i in torch.randperm(len(named)).tolist()]
    order = structure_order([p for _, p in shuffled], names=[n for n, _ in shuffled])
    assert [shuffled[i][0] for i in order] == [n for n, _ in named]


def test_from_shapes_order_is_checked():
    with pytest.raises(ValueError, match=r"Invalid order: \[0, 0\]"):
        NeuralGraph.from_shapes([(2, 3), (2,)], order=[0, 0])


# ----------------------------------------------------------- real scripts
def test_nanogpt_style_loop_runs_unchanged_and_says_what_lr_means():
    """nanoGPT's loop: decay groups, an absolute warmup + cosine lr written
    into every group each iteration, gradient clipping. With ``model=`` the
    graph is the model's; the Adam-style lr is named in one warning."""
    model = gpt()
    opt = NGOptimizer(nanogpt_groups(model), model=model)

    def get_lr(it, peak=6e-4, warmup=2, total=8):
        if it < warmup:
            return peak * (it + 1) / warmup
        ratio = (it - warmup) / (total - warmup)
        return 0.1 * peak + 0.5 * (1 + math.cos(math.pi * ratio)) * 0.9 * peak

    with pytest.warns(UserWarning, match=r"lr=0\.0003 was written into a param group"):
        for it in range(8):
            for group in opt.param_groups:
                group["lr"] = get_lr(it)
            opt.zero_grad()
            lm_loss(model, tokens(it)).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    assert same_graph(opt, NGOptimizer(model.parameters()), model)


@pytest.mark.parametrize("peak", [1.0, 6e-4])
def test_nanogpt_style_loop_trains_with_a_multiplier_and_crawls_with_adams_lr(peak):
    """The same loop, its warmup written as a multiplier of 1.0 (what the
    warning asks for) trains the model; written as Adam's 6e-4 it barely
    moves in 60 steps (the crawl the warning names)."""
    model = gpt()
    opt = NGOptimizer(nanogpt_groups(model), model=model)
    first = lm_loss(model, tokens(99)).item()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if peak < 1 else "error")
        for it in range(60):
            for group in opt.param_groups:
                group["lr"] = peak * min(1.0, (it + 1) / 5)
            opt.zero_grad()
            lm_loss(model, tokens(it)).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    ratio = lm_loss(model, tokens(99)).item() / first
    assert ratio < 0.5 if peak == 1.0 else ratio > 0.95


def test_hf_trainer_default_grouping_with_model(tmp_path, monkeypatch):
    """Hugging Face ``Trainer``'s own decay grouping
    (``get_decay_parameter_names``), passed with ``model=``: the graph of
    ``model.parameters()``, and the Trainer trains."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = gpt()

        def forward(self, input_ids, labels=None):
            return {"loss": lm_loss(self.gpt, input_ids)}

    model = LM()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=8,
        weight_decay=0.1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
    )
    data = [{"input_ids": tokens(i)[j]} for i in range(4) for j in range(8)]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    decay = set(trainer.get_decay_parameter_names(model))
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": 0.1},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    opt = NGOptimizer(groups, model=model)
    trainer.optimizer = opt
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer.train()
    assert same_graph(opt, NGOptimizer(model.parameters()), model)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
