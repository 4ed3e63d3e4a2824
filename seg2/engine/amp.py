"""Mixed-precision training (``SOLVER.AMP.ENABLED``) on CUDA as detectron2 does it, and on the CPU."""

import time

import torch
from detectron2.engine import AMPTrainer
from torch.nn.parallel import DistributedDataParallel

__all__ = ["Seg2AMPTrainer"]


def _model_device_type(model) -> str:
    module = model.module if isinstance(model, DistributedDataParallel) else model
    param = next(module.parameters(), None)
    return param.device.type if param is not None else "cpu"


class Seg2AMPTrainer(AMPTrainer):
    """
    detectron2's :class:`~detectron2.engine.AMPTrainer` that also runs on the CPU.

    On CUDA it is detectron2's trainer unchanged (float16 autocast and a ``GradScaler``). On the
    CPU, where detectron2's asserts CUDA and would use ``torch.cuda.amp.autocast``, it runs the
    same step under ``torch.autocast("cpu", dtype=torch.bfloat16)`` without gradient scaling:
    bfloat16 has float32's exponent range, so gradients do not underflow (PyTorch's AMP recipe).
    The parameters and the optimizer stay in float32; seg2's losses compute in float32.
    """

    def __init__(self, model, data_loader, optimizer, **kwargs):
        self.device_type = _model_device_type(model)
        if self.device_type != "cuda":
            kwargs.setdefault("precision", torch.bfloat16)
            kwargs.setdefault("grad_scaler", torch.amp.GradScaler(self.device_type, enabled=False))
        super().__init__(model, data_loader, optimizer, **kwargs)

    def run_step(self):
        if self.device_type == "cuda":
            return super().run_step()
        # AMPTrainer.run_step with torch.autocast on the model's device instead of CUDA's autocast.
        assert self.model.training, "[Seg2AMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.autocast(device_type=self.device_type, dtype=self.precision):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses, loss_dict = loss_dict, {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        self.after_backward()
        if self.async_write_metrics:
            self.concurrent_executor.submit(
                self._write_metrics, loss_dict, data_time, iter=self.iter
            )
        else:
            self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
