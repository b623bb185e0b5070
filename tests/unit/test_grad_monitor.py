"""Interference monitoring: TensorBoard scalars and heatmap from the Gram matrix."""

import torch

from megamt.config import GradientConfig, ConfigError, MultitaskConfig
from megamt.gradients.monitor import cosine_heatmap, interference_scalars, log_task_gradients


class FakeWriter:
    def __init__(self):
        self.scalars, self.images = {}, {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (value, step)

    def add_image(self, tag, img, step, dataformats="CHW"):
        self.images[tag] = (img, step, dataformats)


def test_scalars_cosines_norms_conflicts():
    g = torch.tensor([[3.0, 0.0], [-1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    G = g @ g.T
    s = interference_scalars(["a", "b", "c"], G)
    assert abs(s["grad/norm/a"] - 3.0) < 1e-12 and abs(s["grad/norm/b"] - 2 ** 0.5) < 1e-12
    assert abs(s["grad/cos/a/b"] + 2 ** -0.5) < 1e-12
    assert s["grad/cos/a/c"] == 0.0
    assert s["grad/conflicts"] == 1.0
    # an absent task is skipped
    s2 = interference_scalars(["a", "b", "c"], G, present=torch.tensor([True, True, False]))
    assert "grad/norm/c" not in s2 and "grad/cos/a/c" not in s2


def test_log_to_writer_and_real_summary_writer(tmp_path):
    G = torch.tensor([[1.0, -0.5], [-0.5, 1.0]])
    w = FakeWriter()
    log_task_gradients(w, 7, ["sst2", "rte"], G)
    assert w.scalars["grad/cos/sst2/rte"] == (-0.5, 7)
    img, step, fmt = w.images["grad/cos_heatmap"]
    assert img.dtype.name == "uint8" and img.shape[0] == 3 and img.shape[1] > 50 and step == 7
    from torch.utils.tensorboard import SummaryWriter
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with SummaryWriter(str(tmp_path)) as sw:
        log_task_gradients(sw, 3, ["sst2", "rte"], G)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert "grad/cos/sst2/rte" in acc.Tags()["scalars"] and "grad/cos_heatmap" in acc.Tags()["images"]
    assert acc.Scalars("grad/conflicts")[0].value == 1.0


def test_heatmap_with_absent_task():
    img = cosine_heatmap(["a", "b"], torch.eye(2), present=torch.tensor([True, False]))
    assert img.shape[0] == 3


def test_gradient_config_checks():
    errs = GradientConfig(cagrad_c=-1, dwa_window=0, gradvac_beta=0.0, grad_backend="cuda").problems("gradients", [])
    text = "\n".join(errs)
    for key in ("cagrad_c", "dwa_window", "gradvac_beta", "grad_backend"):
        assert f"gradients.{key}" in text
    try:
        MultitaskConfig(gradients=GradientConfig(method="nash"))
    except ConfigError as e:
        assert "gradients.method" in str(e)
    else:
        raise AssertionError("an unknown method must be refused")
