"""profile(): attribution per module, parameters, memory, backward, latency, roofline, the
model left untouched, bad input, and the JSON schema."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from leantorch.errors import LeanError, LeanTypeError
from leantorch.measure import DATASHEETS, DeviceSpec, calibrate, profile
from tests.conftest import count


def mlp(n_in: int = 16, hidden: int = 32, n_out: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


# --------------------------------------------------------------------------- attribution
def test_costs_are_booked_to_the_module_that_ran_them() -> None:
    model = mlp()
    report = count(model, torch.randn(5, 16))
    assert report.module("0").forward.macs == 5 * 16 * 32
    assert report.module("1").forward.flops == 5 * 32
    assert report.module("2").forward.macs == 5 * 32 * 8
    root = report.module("")
    assert root.forward.flops == report.flops == sum(
        report.module(p).forward.flops for p in ("0", "1", "2"))
    assert [m.path for m in report.modules] == ["", "0", "1", "2"]
    assert root.children == ["0", "1", "2"]


class Blocks(nn.Module):
    """A ModuleList (never called itself) and a module called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.shared = nn.Linear(8, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.shared(layer(x))
        return x


def test_containers_sum_their_children_and_repeated_calls_accumulate() -> None:
    report = count(Blocks(), torch.randn(2, 8))
    layers = report.module("layers")
    assert layers.calls == 0
    assert layers.forward.flops == 3 * (2 * 2 * 8 * 8 + 2 * 8)
    shared = report.module("shared")
    assert shared.calls == 3
    assert shared.forward.macs == 3 * 2 * 8 * 8
    assert report.flops == layers.forward.flops + shared.forward.flops


class Router(nn.Module):
    """Data-dependent: each token goes to the expert its first feature picks."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(4, 4, bias=False) for _ in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = x[:, 0].long().clamp(0, 3)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = (choice == e).nonzero().flatten()
            if rows.numel():
                out[rows] = expert(x[rows])
        return out


def test_a_data_dependent_model_costs_what_it_ran() -> None:
    x = torch.randn(10, 4)
    x[:, 0] = torch.tensor([0, 0, 0, 0, 1, 1, 3, 3, 3, 3], dtype=torch.float)
    report = count(Router(), x)
    assert report.macs == 10 * 4 * 4  # each token through one expert, not four
    assert report.module("experts.0").forward.macs == 4 * 16
    assert report.module("experts.2").calls == 0
    assert report.module("experts.2").forward.flops == 0


# --------------------------------------------------------------------------- parameters
def test_tied_weights_count_once_and_frozen_are_split() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.head = nn.Linear(8, 50, bias=False)
            self.head.weight = self.embed.weight
            self.norm = nn.LayerNorm(8)
            self.norm.requires_grad_(False)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(self.embed(ids)))

    report = count(Tied(), torch.randint(0, 50, (2, 3)))
    assert report.params.total == 50 * 8 + 16
    assert report.params.frozen == 16
    assert report.params.trainable == 400
    assert report.params.bytes == 416 * 4


# --------------------------------------------------------------------------- memory
def test_saved_activations_match_what_autograd_keeps() -> None:
    model = mlp()
    x = torch.randn(5, 16)
    report = count(model, x, activations=True)
    # Linear 0 keeps its input x (5x16), ReLU its output (5x32), which Linear 2 shares
    assert report.memory.saved_activation_bytes == (5 * 16 + 5 * 32) * 4
    assert report.module("0").saved_bytes == 5 * 16 * 4
    assert report.module("1").saved_bytes == 5 * 32 * 4
    assert report.module("2").saved_bytes == 0


def test_a_frozen_model_saves_nothing() -> None:
    model = mlp().requires_grad_(False)
    report = count(model, torch.randn(5, 16), activations=True)
    assert report.memory.saved_activation_bytes == 0
    assert any("no parameter or input requires grad" in n for n in report.notes)


def test_peak_memory_follows_tensor_lifetimes() -> None:
    model = mlp().eval()
    x = torch.randn(5, 16)
    report = count(model, x)
    # Sequential frees each activation once the next exists: peak = Linear0 out + ReLU out
    assert report.memory.peak_activation_bytes == (5 * 32 + 5 * 32) * 4
    assert report.memory.peak_module == "1"
    resident = sum(p.numel() * 4 for p in model.parameters()) + x.numel() * 4
    assert report.memory.peak_bytes == resident + report.memory.peak_activation_bytes


def test_training_step_keeps_activations_alive_until_backward() -> None:
    model = mlp()
    x = torch.randn(5, 16)
    report = count(model, x, backward=True)
    # all activations live at once during backward, plus every parameter gradient
    grads = sum(p.numel() * 4 for p in model.parameters())
    assert report.memory.peak_activation_bytes >= grads + (5 * 32) * 4


# --------------------------------------------------------------------------- backward
def test_backward_costs_per_module() -> None:
    model = mlp()
    report = count(model, torch.randn(5, 16), backward=True)
    # the first Linear's input needs no gradient: weight grad (5*16*32 MACs) and bias sum only
    assert report.module("0").backward.macs == 5 * 16 * 32
    assert report.module("0").backward.flops == 2 * 5 * 16 * 32 + (5 * 32 - 32)
    # the last one computes both the input and the weight gradients
    assert report.module("2").backward.macs == 2 * 5 * 32 * 8
    assert report.module("1").backward.flops == 5 * 32  # threshold_backward
    assert report.backward.flops == sum(
        report.module(p).backward.flops for p in ("0", "1", "2"))


def test_backward_through_a_leaf_input_that_requires_grad() -> None:
    # a leaf input with requires_grad=True used to crash autograd.grad (a gradient hook on a leaf)
    model = mlp()
    x = torch.randn(5, 16, requires_grad=True)
    report = count(model, x, backward=True)
    # now the first Linear also computes its input gradient: 5*32*16 MACs more
    assert report.module("0").backward.macs == 2 * 5 * 16 * 32
    assert report.module("2").backward.macs == 2 * 5 * 32 * 8
    assert x.grad is None


def test_backward_leaves_grad_attributes_alone() -> None:
    model = mlp()
    model[0].weight.grad = torch.full_like(model[0].weight, 3.0)
    count(model, torch.randn(5, 16), backward=True)
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 3.0))
    assert model[2].weight.grad is None


def test_backward_without_anything_to_differentiate_is_an_error() -> None:
    model = mlp().requires_grad_(False)
    with pytest.raises(LeanError, match="nothing to differentiate"):
        count(model, torch.randn(5, 16), backward=True)


# --------------------------------------------------------------------------- left as it was
class Fragile(nn.Module):
    def __init__(self, fail: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
        self.fail = fail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net(x)
        if self.fail:
            raise RuntimeError("boom")
        return x


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._forward_hooks_always_called) for m in model.modules())


@pytest.mark.parametrize("fail", [False, True])
@pytest.mark.parametrize("backward", [False, True])
def test_model_is_left_exactly_as_it_was(fail: bool, backward: bool) -> None:
    model = Fragile(fail).train()
    model.net[2].eval()  # a mix of modes must survive
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    x = torch.randn(6, 4)
    x_before = x.clone()
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    hooks = _hooks(model)
    context = pytest.raises(LeanError, match="boom") if fail else _nothing()
    with context:
        profile(model, x, train=True, backward=backward, threads=1, runs=2, warmup=1,
                device_spec=None)
    assert [m.training for m in model.modules()] == modes
    for key, value in model.state_dict().items():  # running stats too, though BN ran in train
        assert torch.equal(value, state[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert _hooks(model) == hooks
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.get_num_threads() == threads
    assert torch.equal(x, x_before)
    from torch.nn.modules import module as module_globals

    assert not module_globals._global_forward_hooks
    assert not module_globals._global_forward_pre_hooks


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def test_train_flag_chooses_the_mode_that_runs() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).eval()
    trained = count(model, torch.randn(3, 4), train=True)
    assert trained.training and "aten.bernoulli_" in trained.ops  # dropout drew its mask
    assert not model.training
    evaluated = count(model, torch.randn(3, 4))
    assert not evaluated.training and "aten.bernoulli_" not in evaluated.ops


# --------------------------------------------------------------------------- latency & roofline
def test_latency_is_reported_with_its_thread_count() -> None:
    report = profile(mlp(), torch.randn(5, 16), runs=5, warmup=1, threads=1, device_spec=None)
    t = report.latency
    assert t.runs == 5 and t.warmup == 1 and t.threads == 1
    assert report.machine["threads"] == 1  # the machine block names the threads of the run
    assert 0 < t.min_ms <= t.median_ms <= t.max_ms
    assert t.what == "forward (no_grad)"


def test_roofline_uses_the_device_spec() -> None:
    spec = DATASHEETS["h100-sxm"]
    big = nn.Linear(1024, 1024, bias=False)
    x = torch.randn(512, 1024)
    report = count(big, x, device_spec="h100-sxm")
    f = report.forward
    assert f.compute_seconds == pytest.approx(f.flops / spec.peak(torch.float32))
    assert f.memory_seconds == pytest.approx(f.bytes / spec.bandwidth)
    assert f.roofline_seconds == pytest.approx(max(f.compute_seconds, f.memory_seconds))
    assert f.intensity == pytest.approx(f.flops / f.bytes)
    assert f.bound == "compute"  # 2*512*1024*1024 FLOPs over ~8 MB: ~250 FLOP/B > ridge ~15
    relu = count(nn.ReLU(), x, device_spec="h100-sxm").forward
    assert relu.bound == "memory"  # one FLOP per 8 bytes


def test_calibration_measures_this_machine() -> None:
    spec = calibrate(size=256, copy_mib=8, repeats=2)
    assert spec.peak(torch.float32) > 1e8  # more than 0.1 GFLOP/s
    assert spec.bandwidth > 1e8
    assert "measured here" in spec.source
    assert calibrate(size=256, copy_mib=8, repeats=2) is spec  # cached


def test_device_spec_errors() -> None:
    with pytest.raises(LeanError, match="is not known"):
        count(mlp(), torch.randn(2, 16), device_spec="tpu-v9")
    with pytest.raises(LeanError, match="device_spec must be"):
        count(mlp(), torch.randn(2, 16), device_spec=3)
    custom = DeviceSpec("toy", {"float32": 1e9}, 1e9, 1e9, "test")
    assert count(mlp(), torch.randn(2, 16), device_spec=custom).device is custom


# --------------------------------------------------------------------------- bad input
def test_bad_input_gives_one_line_errors() -> None:
    with pytest.raises(LeanTypeError, match=r"model must be a torch\.nn\.Module, got list"):
        profile([nn.Linear(2, 2)], torch.randn(2))
    with pytest.raises(LeanError) as info:
        count(mlp(), torch.randn(5, 7))
    message = str(info.value)
    assert "float32[5, 7]" in message and "RuntimeError" in message and "\n" not in message
    with pytest.raises(LeanError, match="runs must be an integer >= 1"):
        profile(mlp(), torch.randn(2, 16), runs=0)
    with pytest.raises(LeanError, match="threads must be a positive integer"):
        profile(mlp(), torch.randn(2, 16), threads=0)
    with pytest.raises(LeanTypeError, match="input_kwargs must be a mapping"):
        profile(mlp(), input_kwargs=[1, 2])


def test_a_mapping_input_becomes_keyword_arguments() -> None:
    class Kw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, *, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.lin(x) * scale

    report = count(Kw(), {"x": torch.randn(4, 3), "scale": 2.0})
    assert report.macs == 4 * 3 * 2
    assert report.inputs == [{"name": "x", "shape": [4, 3], "dtype": "float32"}]


def test_example_inputs_in_every_form_count_the_same_and_refuse_a_second_way() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + self.lin(y)

    x, y = torch.randn(4, 3), torch.randn(4, 3)
    kwargs = dict(latency=False, device_spec=None, activations=False)
    reference = profile(Two(), x, y, **kwargs)
    assert reference.macs == 2 * 4 * 3 * 2
    for example in ((x, y), [x, y], {"x": x, "y": y}, ((x,), {"y": y}), ((x, y), {})):
        report = profile(Two(), example_inputs=example, **kwargs)
        assert (report.macs, report.flops) == (reference.macs, reference.flops), example
    single = profile(nn.Linear(3, 2), example_inputs=x, **kwargs)
    assert single.macs == 4 * 3 * 2
    with pytest.raises(LeanError, match=r"profile: example_inputs \(a tuple\) was given together"
                                        r" with 1 positional input\(s\).*give the inputs one way"):
        profile(Two(), x, example_inputs=(x, y), **kwargs)
    with pytest.raises(LeanError, match=r"input_kwargs=a dict; give the inputs one way"):
        profile(Two(), input_kwargs={"y": y}, example_inputs=(x,), **kwargs)


# --------------------------------------------------------------------------- JSON
MODULE_KEYS = {"path", "type", "depth", "calls", "params", "trainable_params", "param_bytes",
               "forward", "backward", "saved_activation_bytes", "children"}
PHASE_KEYS = {"flops", "macs", "matmul_flops", "other_flops", "bytes_read", "bytes_written",
              "weight_bytes_read", "ops", "intensity", "compute_seconds", "memory_seconds",
              "roofline_seconds", "bound"}
TOP_KEYS = {"schema", "schema_version", "model", "inputs", "training", "params", "forward",
            "backward", "memory", "latency", "device", "modules", "ops", "uncounted", "notes",
            "machine"}


def test_json_schema_is_stable(tmp_path) -> None:
    report = profile(mlp(), torch.randn(5, 16), backward=True, runs=2, warmup=0,
                     device_spec="a100-sxm-80gb")
    path = tmp_path / "report.json"
    text = report.to_json(path)
    data = json.loads(path.read_text())
    assert data == json.loads(text)
    assert set(data) == TOP_KEYS
    assert data["schema_version"] == 1
    assert set(data["forward"]) == PHASE_KEYS == set(data["backward"])
    assert all(set(m) == MODULE_KEYS for m in data["modules"])
    assert set(data["memory"]) == {"param_bytes", "buffer_bytes", "input_bytes",
                                   "saved_activation_bytes", "peak_activation_bytes",
                                   "peak_bytes", "peak_module", "device_peak_bytes"}
    assert set(data["latency"]) == {"median_ms", "min_ms", "max_ms", "q1_ms", "q3_ms", "runs",
                                    "warmup", "threads", "device", "what"}
    assert data["forward"]["flops"] == report.flops
    assert data["forward"]["matmul_flops"] + data["forward"]["other_flops"] == report.flops
    assert set(data["machine"]) == {"cpu", "torch_cpu_capability", "threads", "interop_threads",
                                    "torch", "python", "platform", "kernel_paths"}
    assert data["machine"]["threads"] == data["latency"]["threads"]
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind


def test_table_shows_the_tree_to_the_requested_depth() -> None:
    from leantorch.measure.render import table_rows

    report = count(Blocks(), torch.randn(2, 8))
    _, shallow = table_rows(report, depth=1)
    assert [row[0].strip() for row in shallow] == ["(model)", "layers", "shared x3"]
    _, deep = table_rows(report, depth=2)
    assert [row[0].strip() for row in deep] == ["(model)", "layers", "0", "1", "2", "shared x3"]
    text = report.table(depth=2)
    assert text.count("Linear") == 4
    assert "activations saved for backward not measured" in text
