"""Run a set of ``tools/benchmark.py`` configurations, each in its own process, within a time budget.

    python tools/benchmark_suite.py --set levers --out bench_out --budget_s 450
    python tools/benchmark_suite.py --set quick  --out bench_out
    python tools/benchmark_suite.py --set tiny   --out /tmp/t --device cpu      # CPU smoke run
    python tools/benchmark_suite.py --set levers --list                          # print the commands only

Each configuration is a dict of ``benchmark.py`` arguments (``{"mode": "model", "model": ...,
"precision": "bf16", "compile": True}``; True is a bare flag, False/None leave the flag out) plus
three keys of the suite's own: ``name`` (a label), ``needs_s`` (a rough lower bound of its wall
time: it is skipped when less of the budget is left) and ``timeout_s`` (its own limit). Every run is
a fresh ``python tools/benchmark.py ... --json`` process, so compile caches in memory, CUDA graphs
and GPU memory do not leak from one configuration into the next (the on-disk inductor cache is
shared, as in training).

The runs go one after the other, most important first; a run is stopped at its timeout or when the
overall ``--budget_s`` is spent, and the configurations after that are recorded as skipped. Each
outcome is appended to ``<out>/results.jsonl`` as it happens (the numbers, or the failure with the
tail of its stderr); ``<out>/results.md`` (a markdown table for docs/performance.md) is rewritten
after every run, so a suite killed from outside still leaves its table; ``<out>/runs.log`` holds the
whole output of every run. Three files only: a device machine that returns few files gets them all.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from util.fileio import atomic_write_text  # noqa: E402  (plain Python: the suite never imports torch)

BENCHMARK = os.path.join(ROOT, "tools", "benchmark.py")
SUITE_KEYS = ("name", "needs_s", "timeout_s")  # keys of a configuration that are not benchmark.py arguments
DMAE, DCONVMAE = "dmae_vit_base_patch16", "dconvmae_convvit_base_patch16"


def model_config(name, model, needs_s, **args):
    return {"name": name, "needs_s": needs_s, "mode": "model", "model": model, "batch_size": 256, **args}


# Published configuration: fp16 autocast + GradScaler, AdamW with torch's default kernels ("plain";
# the foreach implementation on CUDA). needs_s: process start + model build + FLOP count + 40 steps,
# plus 40-90 s of compilation where compiled (a lower bound, not an estimate of the worst case).
LEVERS = [
    model_config("dmae-b bf16 fused compile", DMAE, 60, precision="bf16", optimizer="fused", compile=True),
    model_config("dconvmae-b bf16 fused compile", DCONVMAE, 70, precision="bf16", optimizer="fused", compile=True),
    model_config("dmae-b bf16 fused eager", DMAE, 12, precision="bf16", optimizer="fused"),
    model_config("dconvmae-b bf16 fused eager", DCONVMAE, 15, precision="bf16", optimizer="fused"),
    model_config("dmae-b fp16+scaler plain eager (published)", DMAE, 12, precision="fp16", optimizer="plain"),
    model_config("dconvmae-b fp16+scaler plain eager (published)", DCONVMAE, 15, precision="fp16",
                 optimizer="plain"),
    model_config("dconvmae-b bf16 fused compile channels_last", DCONVMAE, 70, precision="bf16",
                 optimizer="fused", compile=True, channels_last=True),
    model_config("dconvmae-b bf16 fused eager channels_last", DCONVMAE, 15, precision="bf16",
                 optimizer="fused", channels_last=True),
    model_config("dmae-b bf16 plain eager", DMAE, 12, precision="bf16", optimizer="plain"),
    # autotuning benchmarks many GEMM/Triton configurations: minutes; last, so it only spends what is left
    model_config("dmae-b bf16 fused compile max-autotune-no-cudagraphs", DMAE, 120, precision="bf16",
                 optimizer="fused", compile=True, compile_mode="max-autotune-no-cudagraphs"),
]
QUICK = [c for c in LEVERS if c["name"] in ("dmae-b bf16 fused compile", "dconvmae-b bf16 fused compile",
                                            "dmae-b bf16 fused eager", "dconvmae-b bf16 fused eager")]
TINY = [
    {"name": "dmae-tiny fp32 fused eager", "mode": "model", "model": "dmae_vit_tiny_patch16", "batch_size": 4,
     "input_size": 64, "precision": "fp32", "optimizer": "fused", "steps": 2, "warmup": 1},
    {"name": "dconvmae-tiny fp32 foreach eager channels_last", "mode": "model",
     "model": "dconvmae_convvit_tiny_patch16", "batch_size": 4, "input_size": 64, "precision": "fp32",
     "optimizer": "foreach", "channels_last": True, "steps": 2, "warmup": 1},
]
# The data path and end to end (``--images``: a folder of 512 x 512 grey PNGs the suite makes when it
# holds fewer than ``--make_images``; ``{images}`` and ``{cache}`` are filled in from the options).
# 16 loader workers for the loader alone; 15 end to end, leaving a core to the training process.
# (benchmark.py skips the batches the workers prefetched during the warm-up before it starts timing)
DATA_COMMON = {"data_path": "{images}", "blur": "gaussian", "batch_size": 256, "steps": 60, "warmup": 5}
DATA = [
    {"name": "data: decode + blur each epoch, 16 workers", "mode": "data", "num_workers": 16, "needs_s": 15,
     **DATA_COMMON},
    {"name": "data: decoded cache, 16 workers", "mode": "data", "num_workers": 16, "cache_dir": "{cache}",
     "needs_s": 20, **DATA_COMMON},
    {"name": "e2e dmae-b bf16 compile, decoded cache", "mode": "e2e", "model": DMAE, "precision": "bf16",
     "compile": True, "num_workers": 15, "cache_dir": "{cache}", "needs_s": 70, **DATA_COMMON},
    {"name": "e2e dmae-b bf16 compile, decode + blur each epoch", "mode": "e2e", "model": DMAE,
     "precision": "bf16", "compile": True, "num_workers": 15, "needs_s": 70, **DATA_COMMON},
    {"name": "e2e dconvmae-b bf16 compile, decoded cache", "mode": "e2e", "model": DCONVMAE, "precision": "bf16",
     "compile": True, "num_workers": 15, "cache_dir": "{cache}", "needs_s": 80, **DATA_COMMON},
]
TINY_DATA = [
    {"name": "tiny data: cache", "mode": "data", "data_path": "{images}", "blur": "gaussian", "tiny": True,
     "num_workers": 0, "cache_dir": "{cache}"},
    {"name": "tiny e2e", "mode": "e2e", "data_path": "{images}", "tiny": True, "num_workers": 0},
]
SETS = {"levers": LEVERS, "quick": QUICK, "tiny": TINY, "data": DATA, "tiny_data": TINY_DATA}

TABLE_HEADER = ("| model | precision | compile/mode | channels_last | optimizer | batch | img/s | step ms "
                "| TFLOP/s | peak GiB | warmup s | device |")


# ------------------------------------------------------------------------------ configurations
def config_argv(config: dict) -> list:
    """benchmark.py arguments of one configuration (``mode`` first, then ``--key value`` flags)."""
    argv = [str(config.get("mode", "model"))]
    for key, value in config.items():
        if key in SUITE_KEYS or key == "mode" or value is None or value is False:
            continue
        if value is True:
            argv.append(f"--{key}")
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def parse_value(text: str):
    """An --override value: true/false/none, a number, or the text itself."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def build_configs(args) -> list:
    configs = [dict(c) for c in SETS[args.set]] if not args.configs else load_json_configs(args.configs)
    for text in args.extra:
        extra = json.loads(text)
        configs += [dict(c) for c in (extra if isinstance(extra, list) else [extra])]
    overrides = {"device": args.device, "steps": args.steps, "warmup": args.warmup}
    for item in args.override:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--override {item!r}: expected KEY=VALUE, e.g. batch_size=128")
        overrides[key.lstrip("-")] = parse_value(value)
    places = {"{images}": args.images, "{cache}": args.cache}
    for i, config in enumerate(configs):
        config.setdefault("name", f"config {i + 1}")
        config.setdefault("mode", "model")
        for key, value in config.items():
            if isinstance(value, str) and value in places:
                config[key] = places[value]
        for key, value in overrides.items():
            if value is not None or key not in ("device", "steps", "warmup"):
                config[key] = value
    return configs


def load_json_configs(path: str) -> list:
    try:
        with open(path) as f:
            configs = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--configs {path}: cannot read a JSON list of configurations ({e})")
    if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
        raise SystemExit(f"--configs {path}: expected a JSON list of objects, one per configuration")
    return configs


def uses_images(configs) -> bool:
    return any(c.get("mode") in ("data", "e2e") for c in configs)


def speckle_png(task) -> None:
    """One grey B-mode-like image: gamma speckle blurred by an axially elongated PSF, log-compressed,
    with depth attenuation; it compresses like real ultrasound PNGs (~0.5 bytes per pixel)."""
    import cv2
    import numpy as np
    cv2.setNumThreads(1)
    path, size, seed = task
    rng = np.random.default_rng(seed)
    speckle = rng.gamma(1.0, 1.0, (size, size)).astype(np.float32)
    tissue = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), size / 24) * 2
    image = cv2.GaussianBlur(speckle * (0.3 + tissue), (0, 0), sigmaX=1.2, sigmaY=2.5)
    image *= np.exp(-np.linspace(0, 1.5, size, dtype=np.float32))[:, None]
    image = np.log1p(20 * image) / np.log1p(20 * float(image.max()))
    cv2.imwrite(path, np.clip(image * 255, 0, 255).astype(np.uint8))


def make_images(folder: str, count: int, size: int = 512, workers: int = 0) -> float:
    """Make ``count`` PNGs in ``folder`` unless they are there; returns the seconds it took."""
    import multiprocessing
    names = [os.path.join(folder, f"us_{i:05d}.png") for i in range(count)]
    todo = [(path, size, i) for i, path in enumerate(names) if not os.path.exists(path)]
    start = time.monotonic()
    if todo:
        os.makedirs(folder, exist_ok=True)
        workers = workers or os.cpu_count() or 1
        with multiprocessing.get_context("forkserver").Pool(workers) as pool:
            pool.map(speckle_png, todo, chunksize=16)
    return time.monotonic() - start


# ------------------------------------------------------------------------------ running
class Suite:
    def __init__(self, args, configs):
        self.args, self.configs = args, configs
        self.out = args.out
        self.records = []
        self.started = time.monotonic()
        self.started_at = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.child = None
        self.command = " ".join(shlex.quote(a) for a in ["python", "tools/benchmark_suite.py", *args.argv])

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():7.1f} s] {text}", flush=True)

    def run(self) -> list:
        os.makedirs(self.out, exist_ok=True)
        total = len(self.configs)
        self.say(f"{total} configurations ({self.args.set if not self.args.configs else self.args.configs}), "
                 f"budget {self.args.budget_s:.0f} s, results in {self.out}")
        if uses_images(self.configs):
            took = make_images(self.args.images, self.args.make_images)
            self.say(f"{self.args.make_images} images in {self.args.images} (made in {took:.0f} s)")
        with tempfile.TemporaryDirectory(prefix="benchmark_suite_") as tmp:
            for index, config in enumerate(self.configs, 1):
                record = self.run_one(index, total, config, tmp)
                self.records.append(record)
                with open(os.path.join(self.out, "results.jsonl"), "a") as f:
                    f.write(json.dumps(record) + "\n")
                self.write_markdown()
        counts = {s: sum(r["status"] == s for r in self.records) for s in ("ok", "failed", "timeout", "skipped")}
        self.say("done: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) +
                 f"; table in {os.path.join(self.out, 'results.md')}:\n")
        print(render_markdown(self.records, self.command, self.started_at), flush=True)
        return self.records

    def base_record(self, index, config, argv):
        command = " ".join(shlex.quote(a) for a in ["python", "tools/benchmark.py", *argv])
        source = f"configs:{self.args.configs}" if self.args.configs else self.args.set
        return {"suite_started": self.started_at, "set": source, "index": index, "name": config["name"],
                "config": config, "command": command}

    def run_one(self, index, total, config, tmp) -> dict:
        argv = config_argv(config)
        record = self.base_record(index, config, argv)
        tag = f"{index}/{total} {config['name']}"
        left = self.args.budget_s - self.elapsed()
        needs = float(config.get("needs_s", 0) or 0)
        if left <= 0 or needs > left:
            why = (f"budget of {self.args.budget_s:.0f} s spent" if left <= 0 else
                   f"needs ~{needs:.0f} s, {left:.0f} s of the budget left")
            self.say(f"{tag}: skipped ({why})")
            return {**record, "status": "skipped", "error": f"skipped: {why}", "wall_s": 0.0}
        timeout = min(float(config.get("timeout_s") or self.args.timeout_s), left)
        json_path = os.path.join(tmp, f"{index}.json")
        self.say(f"{tag}: start (timeout {timeout:.0f} s): {record['command']}")
        status, returncode, output, wall = self.spawn(argv + ["--json", json_path], timeout)
        self.append_log(tag, record["command"], status, returncode, output)
        record.update(status=status, returncode=returncode, wall_s=round(wall, 1))
        if status == "ok":
            try:
                with open(json_path) as f:
                    record["result"] = json.load(f)
            except (OSError, ValueError) as e:
                record.update(status="failed", error=f"exited 0 but wrote no readable result ({e})",
                              output_tail=tail(output, self.args.tail_chars))
        elif status == "timeout":
            record.update(error=f"timed out after {timeout:.0f} s", output_tail=tail(output, self.args.tail_chars))
        else:
            record.update(error=last_error_line(output) or f"exit code {returncode}",
                          output_tail=tail(output, self.args.tail_chars))
        if record["status"] == "ok":
            r = record["result"]
            gpu_mem = f", peak {r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else ""
            self.say(f"{tag}: ok, {r['img_per_s']:,.0f} img/s" +
                     (f", {r['step_ms']:.1f} ms/step, warmup {r['warmup_s']:.0f} s" if "step_ms" in r else "") +
                     f"{gpu_mem} (run {wall:.0f} s)")
        else:
            self.say(f"{tag}: {record['status']}: {short(record['error'])} (run {wall:.0f} s)")
        return record

    def spawn(self, argv, timeout):
        """Run benchmark.py in its own process group (so its compile workers can be stopped with it)."""
        start = time.monotonic()
        with tempfile.TemporaryFile(mode="w+") as log:
            # its own process group (stopped as one on a timeout), but not a new session: whatever ends this
            # suite's session ends a run left behind too
            group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
            self.child = subprocess.Popen([self.args.python, BENCHMARK, *argv], cwd=ROOT, stdout=log,
                                          stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                          **group)
            try:
                returncode = self.child.wait(timeout=timeout)
                status = "ok" if returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                self.stop_child()
                returncode, status = None, "timeout"
            finally:
                self.child = None
            log.seek(0)
            output = log.read()
        return status, returncode, output, time.monotonic() - start

    def stop_child(self):
        """SIGTERM the running benchmark's process group, SIGKILL it if still there after 10 s."""
        child = self.child
        if child is None or child.poll() is not None:
            return
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                return
            try:
                child.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue

    def append_log(self, tag, command, status, returncode, output):
        with open(os.path.join(self.out, "runs.log"), "a") as f:
            f.write(f"===== {tag} [{status}, exit {returncode}] at {self.elapsed():.1f} s\n$ {command}\n")
            f.write(output if output.endswith("\n") or not output else output + "\n")

    def write_markdown(self):
        atomic_write_text(os.path.join(self.out, "results.md"), render_markdown(self.records, self.command,
                                                                                 self.started_at))


def tail(text: str, chars: int) -> str:
    return text[-chars:] if len(text) > chars else text


def short(text: str, chars: int = 240) -> str:
    return text if len(text) <= chars else text[:chars - 3] + "..."


def last_error_line(output: str) -> str:
    """The exception line of a traceback (or the last line printed)."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "error", "Interrupt")) or head in ("SystemExit", "usage"):
            return line[:500]
    return lines[-1][:500] if lines else ""


# ------------------------------------------------------------------------------ markdown
def fmt(value, spec=",.0f") -> str:
    return "—" if value is None else format(value, spec)


def model_row(r: dict) -> str:
    precision = r["precision"] + (" + GradScaler" if r.get("scaler") else "")
    compiled = (r.get("compile_mode") or "default") if r.get("compile") else "eager"
    optimizer = r.get("optimizer", "fused")
    if r.get("optimizer_impl") not in (None, optimizer):
        optimizer += f" ({r['optimizer_impl']})"
    cells = [r["model"], precision, compiled, "yes" if r.get("channels_last") else "no", optimizer,
             str(r["batch"]), fmt(r["img_per_s"]), fmt(r.get("step_ms"), ".1f"), fmt(r.get("model_tflops"), ".1f"),
             fmt(r.get("peak_gib"), ".1f"), fmt(r.get("warmup_s"), ".1f"), r.get("device", "—")]
    return "| " + " | ".join(cells) + " |"


def other_row(record: dict) -> str:
    r = record["result"]
    details = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("mode", "img_per_s", "device"))
    return f"| {record['name']} | {r.get('mode', '?')} | {fmt(r['img_per_s'])} | {details} | {r.get('device', '—')} |"


def render_markdown(records: list, command: str, started_at: str) -> str:
    ok = [r for r in records if r["status"] == "ok"]
    models = [r for r in ok if r["result"].get("mode") == "model"]
    others = [r for r in ok if r["result"].get("mode") != "model"]
    torch_versions = sorted({r["result"].get("torch") for r in ok if r["result"].get("torch")})
    lines = [f"Measured with `{command}` (started {started_at}"
             + (f"; torch {', '.join(torch_versions)}" if torch_versions else "") + ").", ""]
    if models:
        lines += ["Model step (synthetic tensors, forward + backward + AdamW; warmup s includes compilation):", "",
                  TABLE_HEADER, "|" + "---|" * TABLE_HEADER.count(" | ") + "---|"]
        lines += [model_row(r["result"]) for r in models]
        lines.append("")
    if others:
        lines += ["| name | mode | img/s | settings | device |", "|---|---|---|---|---|"]
        lines += [other_row(r) for r in others]
        lines.append("")
    missing = [r for r in records if r["status"] != "ok"]
    if missing:
        lines.append("Not measured:")
        lines += [f"- {r['name']}: {r['status']} — {short(r.get('error', ''))}" for r in missing]
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ command line
def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", choices=tuple(SETS), default="levers", help="configuration set (default levers)")
    p.add_argument("--configs", default="", help="a JSON file with a list of configurations, instead of --set")
    p.add_argument("--extra", action="append", default=[],
                   help="a configuration (JSON object) or list of them to run after the set; repeatable")
    p.add_argument("--out", default="benchmark_out", help="folder for results.jsonl, results.md, runs.log")
    p.add_argument("--budget_s", type=float, default=450.0,
                   help="overall wall-time budget; configurations that do not fit are skipped (default 450)")
    p.add_argument("--timeout_s", type=float, default=300.0, help="limit of one run (default 300)")
    p.add_argument("--device", default=None, help="passed to every configuration (default: benchmark.py's)")
    p.add_argument("--steps", type=int, default=None, help="timed steps, passed to every configuration")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps, passed to every configuration")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="set a benchmark.py argument in every configuration (e.g. batch_size=128); repeatable")
    p.add_argument("--images", default=os.path.join(tempfile.gettempdir(), "benchmark_images"),
                   help="folder of PNGs for the data/e2e configurations (made when missing)")
    p.add_argument("--make_images", type=int, default=4096, help="how many 512x512 grey PNGs to make there")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "benchmark_cache"),
                   help="--cache_dir of the configurations that use the decoded cache")
    p.add_argument("--python", default=sys.executable, help="interpreter for the runs (default: this one)")
    p.add_argument("--tail_chars", type=int, default=3000, help="output kept in results.jsonl for a failed run")
    p.add_argument("--list", action="store_true", help="print the commands and exit")
    args = p.parse_args(argv)
    args.argv = argv
    return args


def main(argv=None):
    args = parse_args(argv)
    configs = build_configs(args)
    if args.list:
        for i, config in enumerate(configs, 1):
            extra = "".join(f", {k} {config[k]}" for k in ("needs_s", "timeout_s") if k in config)
            print(f"{i:2d}. {config['name']}{extra}\n    python tools/benchmark.py {shlex.join(config_argv(config))}")
        return configs
    suite = Suite(args, configs)

    def on_signal(signum, _frame):
        suite.stop_child()
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return suite.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    main()
