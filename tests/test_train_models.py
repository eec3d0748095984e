import copy
import functools
import math
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.train.models import MODEL_NAMES, build_model

HEAVY = ("r3d18", "r2plus1d18", "cnn-lstm")
MODELS_3D = ("r3d18", "r2plus1d18", "tiny")


@functools.cache
def _built(name, num_classes):
    torch.manual_seed(0)
    return build_model(name, num_classes)


def build(name, num_classes):
    """A fresh copy of a seeded model: initialising the big ones costs more than copying them."""
    return copy.deepcopy(_built(name, num_classes))


def clip(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---- layer tables, written out by hand from the papers / torchvision --------------------------
# Rows: (module name, kind, shape). A conv contributes a weight of `shape`, a BN (C,) weight and
# bias, the fc an (out, in) weight and (out,) bias. Names are torchvision's, so equality with the
# model's named_parameters() also proves its state_dicts load into ours.


def r3d_block(prefix, c_in, c_out, downsample):
    rows = [
        (f"{prefix}.conv1.0", "conv", (c_out, c_in, 3, 3, 3)),
        (f"{prefix}.conv1.1", "bn", c_out),
        (f"{prefix}.conv2.0", "conv", (c_out, c_out, 3, 3, 3)),
        (f"{prefix}.conv2.1", "bn", c_out),
    ]
    if downsample:
        rows += [
            (f"{prefix}.downsample.0", "conv", (c_out, c_in, 1, 1, 1)),
            (f"{prefix}.downsample.1", "bn", c_out),
        ]
    return rows


def r2plus1d_block(prefix, c_in, c_out, mid, downsample):
    rows = [
        (f"{prefix}.conv1.0.0", "conv", (mid, c_in, 1, 3, 3)),
        (f"{prefix}.conv1.0.1", "bn", mid),
        (f"{prefix}.conv1.0.3", "conv", (c_out, mid, 3, 1, 1)),
        (f"{prefix}.conv1.1", "bn", c_out),
        # torchvision reuses the block's mid width (from c_in) in conv2 too.
        (f"{prefix}.conv2.0.0", "conv", (mid, c_out, 1, 3, 3)),
        (f"{prefix}.conv2.0.1", "bn", mid),
        (f"{prefix}.conv2.0.3", "conv", (c_out, mid, 3, 1, 1)),
        (f"{prefix}.conv2.1", "bn", c_out),
    ]
    if downsample:
        rows += [
            (f"{prefix}.downsample.0", "conv", (c_out, c_in, 1, 1, 1)),
            (f"{prefix}.downsample.1", "bn", c_out),
        ]
    return rows


R3D18_LAYERS = [
    ("stem.0", "conv", (64, 3, 3, 7, 7)),
    ("stem.1", "bn", 64),
    *r3d_block("layer1.0", 64, 64, False),
    *r3d_block("layer1.1", 64, 64, False),
    *r3d_block("layer2.0", 64, 128, True),
    *r3d_block("layer2.1", 128, 128, False),
    *r3d_block("layer3.0", 128, 256, True),
    *r3d_block("layer3.1", 256, 256, False),
    *r3d_block("layer4.0", 256, 512, True),
    *r3d_block("layer4.1", 512, 512, False),
    ("fc", "fc", (400, 512)),
]

# mid = floor(27 * c_in * c_out / (9 * c_in + 3 * c_out)), worked out by hand:
#   64,64: 110592/768 = 144     64,128: 221184/960 = 230.4     128,128: 442368/1536 = 288
#   128,256: 884736/1920 = 460.8   256,256: 1769472/3072 = 576
#   256,512: 3538944/3840 = 921.6  512,512: 7077888/6144 = 1152
R2PLUS1D18_LAYERS = [
    ("stem.0", "conv", (45, 3, 1, 7, 7)),
    ("stem.1", "bn", 45),
    ("stem.3", "conv", (64, 45, 3, 1, 1)),
    ("stem.4", "bn", 64),
    *r2plus1d_block("layer1.0", 64, 64, 144, False),
    *r2plus1d_block("layer1.1", 64, 64, 144, False),
    *r2plus1d_block("layer2.0", 64, 128, 230, True),
    *r2plus1d_block("layer2.1", 128, 128, 288, False),
    *r2plus1d_block("layer3.0", 128, 256, 460, True),
    *r2plus1d_block("layer3.1", 256, 256, 576, False),
    *r2plus1d_block("layer4.0", 256, 512, 921, True),
    *r2plus1d_block("layer4.1", 512, 512, 1152, False),
    ("fc", "fc", (400, 512)),
]


def parameter_shapes(table):
    shapes = []
    for name, kind, shape in table:
        if kind == "conv":
            shapes.append((f"{name}.weight", shape))
        elif kind == "bn":
            shapes += [(f"{name}.weight", (shape,)), (f"{name}.bias", (shape,))]
        else:
            shapes += [(f"{name}.weight", shape), (f"{name}.bias", (shape[0],))]
    return shapes


@pytest.mark.parametrize(
    "name, table, published",
    [
        pytest.param("r3d18", R3D18_LAYERS, 33_371_472, id="r3d18"),
        pytest.param("r2plus1d18", R2PLUS1D18_LAYERS, 31_505_325, id="r2plus1d18"),
    ],
)
def test_resnet_layers_and_parameter_count_match_torchvision(name, table, published):
    expected = parameter_shapes(table)
    assert sum(math.prod(shape) for _, shape in expected) == published
    model = build(name, 400)
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == expected
    assert sum(p.numel() for p in model.parameters()) == published


# ---- forward and backward --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, shape",
    [(n, (2, 3, 8, 64, 64)) for n in HEAVY]
    + [("tiny", (2, 3, 16, 112, 112))]
    + [(n, (2, 3, 1, 32, 40)) for n in MODEL_NAMES],  # a single, non-square frame
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v,
)
def test_output_is_batch_by_classes(name, shape):
    model = build(name, 7).eval()
    with torch.no_grad():
        out = model(clip(shape))
    assert out.shape == (2, 7)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_parameter_gets_a_gradient(name):
    model = build(name, 7).train()
    out = model(clip((2, 3, 2, 32, 32)))  # T=2: at T=1 the LSTM's hidden-to-hidden weights idle
    assert out.shape == (2, 7)
    nn.functional.cross_entropy(out, torch.tensor([1, 6])).backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert silent == []


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_init_is_kaiming_fan_out_with_unit_batchnorm(name):
    model = build(name, 7)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    assert convs
    for conv in convs:
        w = conv.weight
        fan_out = w.shape[0] * math.prod(w.shape[2:])
        if w.numel() >= 1000:  # too few samples below that for a tight std estimate
            assert w.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
    for bn in (m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d))):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_cnn_lstm_runs_each_frame_through_the_cnn_then_reads_the_last_lstm_state():
    model = build("cnn-lstm", 7).eval()
    x = clip((2, 3, 3, 32, 32))
    with torch.no_grad():
        per_frame = torch.stack([model.cnn(x[:, :, t]) for t in range(3)], dim=1)  # (B, T, 512)
        states, _ = model.lstm(per_frame)
        expected = model.fc(states[:, -1])
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)
    # The LSTM must see the frames in order: reversing time changes the answer.
    with torch.no_grad():
        reversed_out = model(x.flip(2))
    assert not torch.allclose(reversed_out, out, rtol=1e-3, atol=1e-6)


# ---- memory formats and autocast -------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS_3D)
def test_channels_last_3d_gives_the_same_logits(name):
    model = build(name, 7).eval()
    x = clip((2, 3, 4, 32, 32))
    with torch.no_grad():
        reference = model(x)
        model.to(memory_format=torch.channels_last_3d)
        out = model(x.contiguous(memory_format=torch.channels_last_3d))
    scale = reference.abs().max().item()
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4 * scale)


def test_cnn_lstm_takes_channels_last():
    model = build("cnn-lstm", 7).eval()
    x = clip((2, 3, 2, 32, 32))
    with torch.no_grad():
        reference = model(x)
        model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last_3d))
    scale = reference.abs().max().item()
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bf16_autocast_stays_close_to_fp32(name):
    # Tiny input: bf16 3D convolutions are slow on CPUs without native bf16.
    model = build(name, 7).eval()
    x = clip((2, 3, 2, 16, 16))
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16
    scale = reference.abs().max().item()
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05 * scale)


# ---- tiny --------------------------------------------------------------------------------------


COLOURS = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]])


def colour_batch(generator, n):
    """(n, 3, 4, 32, 32) noise tinted by the class colour, and the (n,) classes."""
    labels = torch.randint(0, len(COLOURS), (n,), generator=generator)
    noise = torch.randn((n, 3, 4, 32, 32), generator=generator)
    return noise + 0.5 * COLOURS[labels].view(n, 3, 1, 1, 1), labels


def test_tiny_learns_a_class_encoded_in_colour():
    # Fresh noise every step, and held-out clips at the end: memorising a fixed batch would not do.
    generator = torch.Generator().manual_seed(0)
    model = build("tiny", len(COLOURS)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(40):
        x, labels = colour_batch(generator, 8)
        loss = nn.functional.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(4), rel=0.1)  # small fc init: near-uniform start
    assert sum(losses[-5:]) / 5 < 0.3 * losses[0]
    x, labels = colour_batch(generator, 64)
    with torch.no_grad():
        accuracy = (model.eval()(x).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.9


def test_tiny_is_small_and_fast_on_one_core():
    model = build("tiny", 51)
    assert sum(p.numel() for p in model.parameters()) < 100_000
    x, y = clip((8, 3, 16, 112, 112)), torch.arange(8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for _ in range(4):  # the first is warm-up
            start = time.perf_counter()
            nn.functional.cross_entropy(model(x), y).backward()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert sorted(times[1:])[1] < 1.0  # median; about 0.1 s on an idle core


# ---- names and errors --------------------------------------------------------------------------


def test_model_names():
    assert MODEL_NAMES == ("r3d18", "r2plus1d18", "cnn-lstm", "tiny")


@pytest.mark.parametrize("name", ["resnet50", "R3D18", "r3d_18", ""])
def test_unknown_model_names_the_choices(name):
    with pytest.raises(UserError) as e:
        build_model(name, 10)
    assert str(e.value) == (
        f"unknown model '{name}'; choose from r3d18, r2plus1d18, cnn-lstm, tiny, torchvision:<name>"
    )


@pytest.mark.parametrize("num_classes", [0, -3])
def test_num_classes_below_one_is_a_user_error(num_classes):
    with pytest.raises(UserError, match=f"got {num_classes}$"):
        build_model("tiny", num_classes)


def test_torchvision_model_without_torchvision_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    with pytest.raises(UserError) as e:
        build_model("torchvision:r3d_18", 10)
    message = str(e.value)
    assert "'torchvision:r3d_18'" in message and "not installed" in message
    assert "\n" not in message


def fake_torchvision(calls):
    video = types.ModuleType("torchvision.models.video")
    models = types.ModuleType("torchvision.models")
    models.video = video
    models.list_models = lambda module: ["r3d_18", "s3d"] if module is video else ["resnet18"]

    def get_model(arch, **kwargs):
        calls.append((arch, kwargs))
        return nn.Identity()

    models.get_model = get_model
    torchvision = types.ModuleType("torchvision")
    torchvision.models = models
    return torchvision


def test_torchvision_video_models_are_built_untrained_with_our_class_count(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "torchvision", fake_torchvision(calls))
    assert isinstance(build_model("torchvision:s3d", 12), nn.Identity)
    assert calls == [("s3d", {"weights": None, "num_classes": 12})]
    for arch in ("resnet18", "nope"):  # an image model is not a video model
        with pytest.raises(UserError, match=f"unknown torchvision video model '{arch}'; .*r3d_18"):
            build_model(f"torchvision:{arch}", 12)


def test_built_in_models_never_import_torchvision():
    # A finder that fails loudly on any attempt, so even a guarded `try: import torchvision` shows.
    code = (
        "import sys\n"
        "class NoTorchvision:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        assert name.split('.')[0] != 'torchvision', 'torchvision was imported'\n"
        "sys.meta_path.insert(0, NoTorchvision())\n"
        "sys.modules.pop('torchvision', None)\n"
        "from pipeline.train.models import MODEL_NAMES, build_model\n"
        "for name in MODEL_NAMES: build_model(name, 3)\n"
    )
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=repo, check=True, timeout=60)


@pytest.mark.parametrize("ours, theirs", [("r3d18", "r3d_18"), ("r2plus1d18", "r2plus1d_18")])
def test_torchvision_weights_load_and_give_the_same_logits(ours, theirs):
    torchvision = pytest.importorskip("torchvision")
    reference = torchvision.models.get_model(theirs, weights=None, num_classes=5).eval()
    model = build(ours, 5).eval()
    model.load_state_dict(reference.state_dict())
    x = clip((2, 3, 2, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_imagenet_resnet18_weights_load_into_the_cnn_lstm_frame_cnn():
    torchvision = pytest.importorskip("torchvision")
    reference = torchvision.models.resnet18(weights=None).eval()
    model = build("cnn-lstm", 7).eval()
    result = model.cnn.load_state_dict(reference.state_dict(), strict=False)
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == ["fc.bias", "fc.weight"]
    reference.fc = nn.Identity()
    frames = clip((2, 3, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(model.cnn(frames), reference(frames))
