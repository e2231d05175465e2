"""lopt's tests; a package so that spawned workers import test modules by name."""
