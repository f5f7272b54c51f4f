"""Optimizers emitted by lopt-compile, one package per spec."""
