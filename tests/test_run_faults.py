"""Issue 23, parts 2-5: the faults users make with runs, on real files in tmp folders: two runs on
one OUTPUT_DIR, weights that are not the model's, exact resume, and one line per user mistake."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
EXPORT = os.path.join(REPO, "tools", "export_model.py")
UNET = os.path.join(REPO, "configs", "quickstart", "unet_tiny_shapes_cpu.yaml")
FCN = os.path.join(REPO, "configs", "quickstart", "fcn8s_vgg16-tiny_shapes_cpu.yaml")


def _env():
    pythonpath = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=pythonpath)
    env.pop("SEG2_DEBUG", None)
    return env


def _small(shapes_root, out):
    """A U-Net of a few thousand parameters on 64-px shapes: seconds per run."""
    return [
        "SEG2.SHAPES_ROOT",
        str(shapes_root),
        "OUTPUT_DIR",
        str(out),
        "MODEL.UNET_ENCODER.CHANNELS",
        "[4, 4, 8, 8, 8]",
        "INPUT.MIN_SIZE_TRAIN",
        "(64,)",
        "INPUT.MAX_SIZE_TRAIN",
        "64",
        "INPUT.MIN_SIZE_TEST",
        "64",
        "INPUT.MAX_SIZE_TEST",
        "64",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "SOLVER.WARMUP_ITERS",
        "1",
        "DATALOADER.NUM_WORKERS",
        "0",
        "SEED",
        "5",
    ]


def _train_net(*args, config=UNET, timeout=600):
    return subprocess.run(
        [sys.executable, TRAIN_NET, "--config-file", config, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        cwd=REPO,
    )


def _one_line_error(r, starts):
    """The run ended with exit status 1 and the last stderr line ``seg2: error: <starts>...``, no
    traceback."""
    log = r.stdout + r.stderr
    assert r.returncode == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("seg2: error: " + starts), last
    return last


# ---- 2. Runs that mix ---------------------------------------------------------------------------

_HOLDER = textwrap.dedent("""
    import sys, time
    from seg2.engine.run_lock import acquire_run_lock
    lock = acquire_run_lock(sys.argv[1], what="holder-script --for-the-test")
    print("locked", flush=True)
    time.sleep(600)
""")


def test_second_run_on_one_output_dir_is_refused_and_a_killed_run_leaves_no_lock(
    tiny_shapes_root, tmp_path
):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = _train_net(
            *_small(tiny_shapes_root, out), "SOLVER.MAX_ITER", "1", "DATASETS.TEST", "()"
        )
        line = _one_line_error(
            r, f"OUTPUT_DIR={out} is in use by another seg2 run (pid {holder.pid} on host "
        )
        assert "holder-script --for-the-test" in line and "started 20" in line
        assert not (out / "config.yaml").exists()  # refused before default_setup writes anything
        # --eval-only takes the lock too (it writes config.yaml, log.txt and inference/ there)
        r = _train_net("--eval-only", *_small(tiny_shapes_root, out))
        _one_line_error(r, f"OUTPUT_DIR={out} is in use by another seg2 run (pid {holder.pid} ")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel dropped the killed holder's lock: the next run starts.
    r = _train_net(*_small(tiny_shapes_root, out), "SOLVER.MAX_ITER", "1", "DATASETS.TEST", "()")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert (out / "model_final.pth").is_file()


def test_run_lock_is_shared_within_one_process_and_released_after_training(tmp_path):
    from seg2.engine.run_lock import acquire_run_lock

    a = acquire_run_lock(str(tmp_path))
    b = acquire_run_lock(str(tmp_path))  # setup() and then the Trainer, in one process
    a.release()
    assert b.held
    probe = [
        sys.executable,
        "-c",
        "import sys; from seg2.engine.run_lock import acquire_run_lock as a; "
        "a(sys.argv[1]); print('got it')",
        str(tmp_path),
    ]
    r = subprocess.run(probe, capture_output=True, text=True, env=_env(), cwd=REPO)
    assert r.returncode != 0 and f"pid {os.getpid()} " in r.stderr
    b.release()
    r = subprocess.run(probe, capture_output=True, text=True, env=_env(), cwd=REPO)
    assert r.returncode == 0 and "got it" in r.stdout, r.stderr


# ---- 3. Weights that are not the model's -------------------------------------------------------


def _save_model_of(tmp_path, name, shapes_root, *opts, config=UNET):
    """A real checkpoint ({"model": state_dict}) of the model of ``config`` with ``opts``."""
    import torch
    from detectron2.modeling import build_model

    from seg2 import load_seg2_config

    cfg = load_seg2_config(config, _small(shapes_root, tmp_path / "unused") + list(opts))
    model = build_model(cfg)
    path = tmp_path / name
    torch.save({"model": model.state_dict()}, path)
    return str(path), len(model.state_dict())


def test_eval_only_with_weights_of_another_model_is_an_error(tiny_shapes_root, tmp_path):
    # Before: detectron2 logged the mismatch, loaded nothing and reported a random model's mIoU.
    wider, n = _save_model_of(
        tmp_path, "wider.pth", tiny_shapes_root, "MODEL.UNET_ENCODER.CHANNELS", "[8, 8, 8, 8, 8]"
    )
    r = _train_net(
        "--eval-only", *_small(tiny_shapes_root, tmp_path / "out"), "MODEL.WEIGHTS", wider
    )
    line = _one_line_error(
        r, f"the checkpoint {wider} does not fit this config's Seg2SemanticSegmentor: "
    )
    assert " have another shape (" in line and "mIoU" not in r.stdout
    fcn, _ = _save_model_of(tmp_path, "fcn.pth", tiny_shapes_root, config=FCN)
    r = _train_net("--eval-only", *_small(tiny_shapes_root, tmp_path / "out"), "MODEL.WEIGHTS", fcn)
    line = _one_line_error(
        r, f"the checkpoint {fcn} does not fit this config's Seg2SemanticSegmentor: "
    )
    assert (
        "parameters and buffers are not in the file (e.g. 'backbone." in line
        and "entries are not in the model" in line
    )
    # No weights at all: a random model.
    r = _train_net("--eval-only", *_small(tiny_shapes_root, tmp_path / "out"), "MODEL.WEIGHTS", "")
    _one_line_error(
        r, "--eval-only with MODEL.WEIGHTS empty would evaluate a randomly initialised model"
    )


def test_checkpointer_strict_and_training_start(tiny_shapes_root, tmp_path):
    from detectron2.modeling import build_model

    from seg2 import Seg2Error, load_seg2_config
    from seg2.checkpoint import Seg2Checkpointer

    own, n = _save_model_of(tmp_path, "own.pth", tiny_shapes_root)
    fcn, n_fcn = _save_model_of(tmp_path, "fcn.pth", tiny_shapes_root, config=FCN)
    model = build_model(load_seg2_config(UNET, _small(tiny_shapes_root, tmp_path / "o")))
    Seg2Checkpointer(model).load(own)  # the model's own weights: fine
    with pytest.raises(Seg2Error) as e:
        Seg2Checkpointer(model).load(fcn)
    # The counts by hand: the models share no name; BatchNorm's step counters (num_batches_tracked)
    # are excused.
    import torch

    mine = set(torch.load(own, weights_only=False)["model"])
    theirs = set(torch.load(fcn, weights_only=False)["model"])
    assert not mine & theirs
    missing = [k for k in mine if not k.endswith("num_batches_tracked")]
    assert len(missing) < n  # the U-Net has BatchNorm
    assert f"{len(missing)} of the model's {n} parameters and buffers are not in the file" in str(
        e.value
    )
    assert f"{n_fcn} of the file's {n_fcn} entries are not in the model" in str(e.value)
    # Starting a training (strict=False): a file of which nothing fits is refused, ...
    with pytest.raises(
        Seg2Error, match=rf"^none of the {n_fcn} entries of {fcn} fits this config's Seg2Semantic"
    ):
        Seg2Checkpointer(model, strict=False).load(fcn)
    # ... a backbone alone (heads new, as with ImageNet weights) is not.
    backbone = {
        k: v
        for k, v in torch.load(own, weights_only=False)["model"].items()
        if k.startswith("backbone.")
    }
    torch.save({"model": backbone}, tmp_path / "backbone.pth")
    Seg2Checkpointer(model, strict=False).load(str(tmp_path / "backbone.pth"))
    with pytest.raises(
        Seg2Error, match="parameters and buffers are not in the file .e.g. 'sem_seg_head"
    ):
        Seg2Checkpointer(model).load(str(tmp_path / "backbone.pth"))


def test_export_refuses_random_weights_unless_asked(tmp_path, tiny_shapes_root):
    args = [
        sys.executable,
        EXPORT,
        "--config-file",
        UNET,
        "--format",
        "torchscript",
        "--output",
        str(tmp_path / "x"),
    ]
    small = _small(tiny_shapes_root, tmp_path / "o")
    r = subprocess.run(
        [*args, *small, "MODEL.WEIGHTS", ""], capture_output=True, text=True, env=_env(), cwd=REPO
    )
    _one_line_error(r, "MODEL.WEIGHTS is empty: the export would hold a randomly initialised model")
    assert not (tmp_path / "x" / "model.ts").exists()
    fcn, _ = _save_model_of(tmp_path, "fcn.pth", tiny_shapes_root, config=FCN)
    r = subprocess.run(
        [*args, *small, "MODEL.WEIGHTS", fcn], capture_output=True, text=True, env=_env(), cwd=REPO
    )
    _one_line_error(r, f"the checkpoint {fcn} does not fit this config's Seg2SemanticSegmentor")
    own, _ = _save_model_of(tmp_path, "own.pth", tiny_shapes_root)
    r = subprocess.run(
        [*args, *small, "MODEL.WEIGHTS", own], capture_output=True, text=True, env=_env(), cwd=REPO
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert (tmp_path / "x" / "model.ts").is_file()


# ---- 4. Exact resume ---------------------------------------------------------------------------


def _mixed_folder(root, n=7):
    """Images wider than tall and taller than wide (aspect-ratio grouping leaves half-filled
    batches), with 4-class label maps."""
    import numpy as np
    from PIL import Image

    from seg2.data import write_label_map

    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "labels"), exist_ok=True)
    rng = np.random.default_rng(11)
    for i in range(n):
        h, w = (40, 56) if rng.random() < 0.5 else (56, 40)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            os.path.join(root, "images", f"{i}.png")
        )
        label = np.zeros((h, w), np.uint8)
        label[h // 4 : h // 2, w // 4 :] = 1 + i % 3
        write_label_map(label, os.path.join(root, "labels", f"{i}.png"))


class _Record:
    """A hook recording a draw of python's, numpy's and torch's RNGs before each step (as dropout
    or RoI sampling would draw), and stopping the run (as Ctrl-C does) after iteration ``stop``."""

    def __init__(self, stop=None):
        from detectron2.engine import HookBase

        outer = self

        class Hook(HookBase):
            def before_step(self):
                import random

                import numpy as np
                import torch

                outer.draws[self.trainer.iter] = (
                    random.random(),
                    float(np.random.rand()),
                    float(torch.rand(1)),
                )

            def after_step(self):
                if outer.stop is not None and self.trainer.iter == outer.stop:
                    raise KeyboardInterrupt

        self.stop, self.draws, self.hook = stop, {}, Hook()


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(tmp_path, workers):
    import torch
    from detectron2.utils.env import seed_all_rng

    from seg2 import load_seg2_config
    from seg2.data import register_sem_seg_folder
    from seg2.engine import Trainer

    name = f"seg2_test_exact_resume_{workers}"
    _mixed_folder(str(tmp_path / "data"))
    register_sem_seg_folder(
        name,
        str(tmp_path / "data" / "images"),
        str(tmp_path / "data" / "labels"),
        ["bg", "a", "b", "c"],
    )

    def run(out, resume=False, stop=None):
        cfg = load_seg2_config(
            UNET,
            _small("", out)
            + [
                "DATASETS.TRAIN",
                f"('{name}',)",
                "DATASETS.TEST",
                "()",
                "SEG2.BEST_CHECKPOINT.METRIC",
                "",
                "INPUT.MIN_SIZE_TRAIN",
                "(32, 40)",
                "INPUT.MAX_SIZE_TRAIN",
                "64",
                "INPUT.RANDOM_FLIP",
                "horizontal",
                "SOLVER.MAX_ITER",
                "9",
                "SOLVER.CHECKPOINT_PERIOD",
                "3",
                "SOLVER.BASE_LR",
                "0.05",
                "DATALOADER.NUM_WORKERS",
                str(workers),
                "DATALOADER.ASPECT_RATIO_GROUPING",
                "True",
                "SEED",
                "3",
            ],
        )
        seed_all_rng(
            cfg.SEED if not resume else 12345
        )  # a resumed process starts from other RNG states
        trainer = Trainer(cfg)
        record = _Record(stop)
        trainer.register_hooks([record.hook])
        trainer.resume_or_load(resume=resume)
        try:
            trainer.train()
        except KeyboardInterrupt:
            pass
        return trainer, record.draws

    full, full_draws = run(tmp_path / "full")
    part, _ = run(
        tmp_path / "part", stop=4
    )  # Ctrl-C during iteration 4; the last checkpoint is after iteration 2
    assert (tmp_path / "part" / "last_checkpoint").read_text() == "model_0000002.pth"
    assert not (tmp_path / "part" / "model_final.pth").exists()
    state = torch.load(tmp_path / "part" / "model_0000002.pth", weights_only=False)["data_order"]
    assert state["position"] == 3 * 2 + sum(
        len(b) for b in state["buckets"]
    )  # 3 batches of 2 + waiting
    resumed, resumed_draws = run(tmp_path / "part", resume=True)
    assert resumed.start_iter == 3
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different
    # the weights did change, and the RNG draws after the resume are the uninterrupted run's
    first = torch.load(tmp_path / "part" / "model_0000002.pth", weights_only=False)["model"]
    assert any(not torch.equal(first[k], a[k]) for k in a)
    assert {i: resumed_draws[i] for i in range(3, 9)} == {i: full_draws[i] for i in range(3, 9)}


# ---- 5. One line for every user mistake ---------------------------------------------------------


def _train_once(shapes_root, out, *extra, flags=()):
    r = _train_net(
        *flags,
        *_small(shapes_root, out),
        "DATASETS.TEST",
        "()",
        "SEG2.BEST_CHECKPOINT.METRIC",
        "",
        *extra,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r


def test_device_and_gpu_count_beyond_the_machine(tiny_shapes_root, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: the mistake is not one here")
    small = _small(tiny_shapes_root, tmp_path / "out")
    r = _train_net(*small, "MODEL.DEVICE", "cuda", "SOLVER.MAX_ITER", "1")
    _one_line_error(r, "MODEL.DEVICE=cuda, but torch finds no CUDA device on this machine")
    r = _train_net("--num-gpus", "2", *small, "SOLVER.MAX_ITER", "1")
    _one_line_error(
        r, "--num-gpus 2, but torch finds 0 CUDA device(s) on this machine: use --num-gpus 1"
    )


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text('_BASE_: "{}"\nSOLVER:\n  BASE_LR: [0.01\n  MAX_ITER: 5\n'.format(UNET))
    r = _train_net(config=str(bad))
    line = _one_line_error(r, f"bad YAML in {bad}, line ")
    assert "column" in line


def test_missing_weights_file_is_named(tiny_shapes_root, tmp_path):
    missing = tmp_path / "no_such_model.pth"
    r = _train_net(
        *_small(tiny_shapes_root, tmp_path / "out"),
        "MODEL.WEIGHTS",
        str(missing),
        "SOLVER.MAX_ITER",
        "1",
    )
    _one_line_error(r, f"the checkpoint {missing} does not exist (MODEL.WEIGHTS")


def test_resume_when_last_checkpoint_was_deleted(tiny_shapes_root, tmp_path):
    out = tmp_path / "out"
    _train_once(tiny_shapes_root, out, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2")
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    os.remove(out / "model_final.pth")
    # Falls back to the newest checkpoint left, saying so.
    r = _train_once(
        tiny_shapes_root,
        out,
        "SOLVER.MAX_ITER",
        "6",
        "SOLVER.CHECKPOINT_PERIOD",
        "2",
        flags=["--resume"],
    )
    log = r.stdout + r.stderr
    assert (
        f"--resume: {out / 'last_checkpoint'} names {out / 'model_final.pth'}, which does not "
        "exist; resuming "
        f"from {out / 'model_0000003.pth'}, the newest checkpoint left (of 2)"
    ) in log
    assert "Starting training from iteration 4" in log
    # Nothing left at all: an error, not a silent start from scratch.
    for name in os.listdir(out):
        if name.endswith(".pth"):
            os.remove(out / name)
    r = _train_net(
        "--resume", *_small(tiny_shapes_root, out), "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "6"
    )
    _one_line_error(
        r,
        f"--resume: {out / 'last_checkpoint'} names {out / 'model_final.pth'}, which does not "
        "exist, "
        f"and {out} holds no other checkpoint",
    )


def test_resume_from_another_architecture(tiny_shapes_root, tmp_path):
    out = tmp_path / "out"
    _train_once(tiny_shapes_root, out, "SOLVER.MAX_ITER", "1")
    r = _train_net(
        "--resume",
        *_small(tiny_shapes_root, out),
        "DATASETS.TEST",
        "()",
        "SOLVER.MAX_ITER",
        "2",
        "MODEL.UNET_ENCODER.CHANNELS",
        "[8, 8, 8, 8, 8]",
    )
    line = _one_line_error(
        r,
        f"the checkpoint {out / 'model_final.pth'} does not fit this config's "
        "Seg2SemanticSegmentor",
    )
    assert "have another shape" in line


_FSIZE_LAUNCHER = textwrap.dedent("""
    import resource, runpy, signal, sys
    # Writes past {limit} bytes per file fail (EFBIG) as on a full disk: a checkpoint's do, logs'
    # do not.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    sys.argv = [{train_net!r}] + sys.argv[1:]
    runpy.run_path({train_net!r}, run_name="__main__")
""")


def test_checkpoint_write_cut_short_leaves_no_partial_file(tiny_shapes_root, tmp_path):
    out = tmp_path / "out"
    _train_once(tiny_shapes_root, out, "SOLVER.MAX_ITER", "1")
    size = os.path.getsize(out / "model_final.pth")
    old = (out / "model_final.pth").read_bytes()
    # A wider model: its checkpoints are larger than the limit; the small one's and the logs fit.
    wide = "[32, 32, 32, 32, 32]"
    limit = 4 * size
    script = tmp_path / "launch.py"
    script.write_text(_FSIZE_LAUNCHER.format(limit=limit, train_net=TRAIN_NET))
    r = subprocess.run(
        [
            sys.executable,
            str(script),
            "--config-file",
            UNET,
            *_small(tiny_shapes_root, out),
            "DATASETS.TEST",
            "()",
            "SOLVER.MAX_ITER",
            "2",
            "MODEL.UNET_ENCODER.CHANNELS",
            wide,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
        cwd=REPO,
    )
    line = _one_line_error(r, f"cannot write {out / 'model_final.pth'} (")
    assert "is " + str(out) + " (OUTPUT_DIR) full or read-only?" in line
    assert (
        sorted(n for n in os.listdir(out) if n.startswith(".tmp-")) == []
    )  # the partial file is gone
    assert (out / "model_final.pth").read_bytes() == old  # the earlier checkpoint is untouched
    assert (out / "last_checkpoint").read_text() == "model_final.pth"


def test_read_only_output_dir(tiny_shapes_root, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; run as a user to test this")
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        r = _train_net(*_small(tiny_shapes_root, out), "SOLVER.MAX_ITER", "1")
        _one_line_error(r, f"OUTPUT_DIR={out}: cannot create the run lock ")
    finally:
        out.chmod(0o755)
