"""backend="auto" sends each tensor to the fastest kernels of its device: CPU tensors to
TVM's, CUDA tensors to the cuda backend's, the rest to the reference with one warning.
CUDA tensors are stood in for here (no GPU); tests/test_gpu_reference.py steps real ones."""
from __future__ import annotations

import shutil
import warnings
from types import SimpleNamespace

import pytest
import torch

from generated.adam import Adam
from generated.velo import VeLO
from lopt_codegen.backends import select_backend
from lopt_codegen.backends.base import StepBatch, TensorTask


class Recorder:
    def __init__(self):
        self.batches: list[StepBatch] = []

    def step(self, batch: StepBatch) -> None:
        self.batches.append(batch)


def fake_cuda(dtype=torch.float32, contiguous: bool = True) -> TensorTask:
    p = SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, numel=lambda: 4,
                        is_contiguous=lambda: contiguous)
    return TensorTask(p, p, {}, {}, "unfactored", None)


def cpu_task() -> TensorTask:
    p = torch.randn(4)
    return TensorTask(p, torch.randn(4), {}, {}, "unfactored", None)


def recorded(program):
    backend = select_backend(program, "auto")
    backend.cpu, backend.cuda, backend.reference = Recorder(), Recorder(), Recorder()
    return backend


def tasks_of(recorder: Recorder) -> list[TensorTask]:
    return [t for batch in recorder.batches for t in batch.tasks]


def test_cpu_tensors_run_tvm_kernels():
    p = torch.nn.Parameter(torch.randn(5, 3))
    p.grad = torch.randn(5, 3)
    opt = Adam([p], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # nothing falls back
        opt.step()
    assert opt.backend.cpu.name == "tvm" and opt.backend.cpu._kernels


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="CUDA tensors go to the reference without nvcc")
def test_each_tensor_goes_to_its_device_s_backend():
    backend = recorded(Adam.program)
    on_cpu, on_gpu, on_gpu_f64, strided = cpu_task(), fake_cuda(), fake_cuda(torch.float64), fake_cuda(contiguous=False)
    with pytest.warns(RuntimeWarning) as caught:
        backend.step(StepBatch([on_cpu, on_gpu, on_gpu_f64, strided]))
    assert tasks_of(backend.cpu) == [on_cpu]
    assert tasks_of(backend.cuda) == [on_gpu]
    assert tasks_of(backend.reference) == [on_gpu_f64, strided]
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2 and "torch.float64" in messages[1] and "non-contiguous" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # once per reason
        backend.step(StepBatch([on_gpu_f64]))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="CUDA tensors go to the reference without nvcc")
def test_a_batch_on_one_device_goes_whole():
    backend = recorded(Adam.program)
    batch = StepBatch([fake_cuda(), fake_cuda()])
    backend.step(batch)
    assert backend.cuda.batches == [batch] and not backend.cpu.batches


def test_a_network_over_mixed_devices_runs_on_the_reference():
    """VeLO's network couples every tensor of a step: one backend runs them all."""
    backend = recorded(VeLO.program)
    batch = StepBatch([cpu_task(), fake_cuda()], network=object())
    with pytest.warns(RuntimeWarning, match="network"):
        backend.step(batch)
    assert backend.reference.batches == [batch] and not backend.cpu.batches and not backend.cuda.batches


def test_cuda_tensors_without_nvcc_say_so(monkeypatch):
    from lopt_codegen.backends.cuda import backend as cuda_backend

    monkeypatch.setattr(cuda_backend, "nvcc_missing", lambda: "nvcc was not found")
    backend = recorded(Adam.program)
    with pytest.warns(RuntimeWarning, match="nvcc"):
        backend.step(StepBatch([fake_cuda()]))
    assert len(tasks_of(backend.reference)) == 1


def test_cpu_training_never_makes_the_cuda_backend():
    backend = select_backend(Adam.program, "auto")
    p = torch.nn.Parameter(torch.randn(4))
    backend.cpu = Recorder()
    backend.step(StepBatch([TensorTask(p, torch.randn(4), {}, {}, "unfactored", None)]))
    assert "cuda" not in vars(backend)
