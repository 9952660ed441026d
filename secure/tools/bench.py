"""`deepreduce bench`: stock CrypTen against this project's runtime, on the same models, in one run.

For every model and batch size it runs

* **stock**: the path a CrypTen user would write (`secure.tools.stock`): ``crypten.nn.from_pytorch`` on the
  PyTorch model with batch-norm left in, ``encrypt(src=0)`` at the server, the input encrypted with
  ``src=1`` at the client; one session answers ``repeats`` queries;
* **ours**: `secure.tools.local.run_local_parties` on the model's secure plan (batch-norm folded), one
  session per repeat;

both with the dealer (CrypTen's TTP or the runtime's own) as a third process, all three on
127.0.0.1, on the same random-weight checkpoint (or the same trained frontier checkpoint) and the
same random inputs (cost does not depend on the pixel values). Reported per model and batch size:
online latency per image (median over the repeats), offline time per image, online MB per image
(sent + received by the server party), online rounds per batch, the ReLU and linear shares of the
online time, ``speedup`` = stock online_s / ours online_s, and LAN/WAN projections
(`secure.tools.netmodel`). Both runtimes' logits are checked against the plaintext PyTorch model
(``max_abs_error``).

With `--plan M.plan` (plans from `deepreduce export`, e.g. any PyTorch CNN via `--module`) there is no
PyTorch model for stock CrypTen's `from_pytorch`: the baseline column is then CrypTen's MPC tensors on the
same plan (the reference engine, `engine="crypten"`), and both are checked against the plan in plaintext.

With an emulated link (`BenchSettings.link`, `deepreduce bench --link rtt=20ms,rate=100mbit`;
`secure.tools.linkemu`) ours runs over that link and stock is skipped (CrypTen meets over gloo, whose
sockets the relay cannot carry); the report says so in its tables and JSON ("link"), and has no
projections (they project loopback figures; `python -m secure.measure --link` puts an emulated run next
to its projection).

`--relu-protocol` (`BenchSettings.relu_protocol`) picks ours' ReLU protocol (fast engine): auto (default:
picked per model for its plan and the link, LAN without --link; each pick is logged), gmw, fss, or both:
each model and batch size then has one entry per protocol, with the same stock figures (measured once).
Every entry records "relu_protocol" (null for the crypten engine), the tables have a column for it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from deepreduce.checkpoint import Checkpoint, load_checkpoint, random_checkpoint
from deepreduce.errors import UserError
from deepreduce.fileio import atomic_output, atomic_write_json
from deepreduce.relus import relu_count
from deepreduce.spec import ModelSpec

from secure.core.export import plan_from_checkpoint
from secure.core.plaintext import run_plaintext
from secure.core.plan import SecurePlan
from secure.core.runtime import DEFAULT_ENGINE, ENGINES
from secure.tools.linkemu import LAN, Link
from secure.tools.local import (DEFAULT_TOOL_RELU_CHOICE, check_relu_choice, relu_choice_note, relu_protocols)
from secure.tools.stock import plaintext_logits, run_stock_local

try:  # the latency model for real networks (optional: projections are skipped without it)
    from secure.tools.netmodel import PROJECTIONS, predict_latency
except ImportError:  # pragma: no cover - only while secure/netmodel.py is missing
    PROJECTIONS, predict_latency = {}, None

BENCH_FORMAT_VERSION = 1
BENCH_KIND = "deepreduce-bench"
QUICK_RELU_LIMIT = 100_000
# Queries run first and not counted, for both runtimes: the first query after a process starts pays
# one-off costs (lazy kernel and thread-pool set-up, first-touch page faults) a serving process does not.
DEFAULT_WARMUP = 1
RUNTIMES = ("stock", "ours")

# The DeepReDuce models benchmarked without a frontier (random weights: latency does not depend on
# the weight values). Name -> ModelSpec fields; the full ResNet18 is added separately.
FULL_RESNET18 = "resnet18-full"
GOLDEN_SPECS = {
    "s2s3-thin": dict(alpha=1.0, cull=(1, 4), thin="bottom", stem_relu=False),  # 98,304 ReLUs
    "demo-a0.5-s2s3-thin": dict(alpha=0.5, cull=(1, 4), thin="bottom", stem_relu=False),  # 49,152: the first (interim) demo spec
    "no-relu": dict(alpha=1.0, cull=(1, 2, 3, 4), stem_relu=False),  # 0 ReLUs: linear layers only
}
QUICK_GOLDEN = ("s2s3-thin",)


@dataclass
class BenchModel:
    name: str
    checkpoint: Checkpoint | None  # batch-norm in: the stock path runs it as is, ours exports its plan
    source: str  # "random weights (seed N)", the checkpoint path, or the plan path
    accuracy: float | None = None  # frontier models: test accuracy in percent
    _plan: SecurePlan | None = field(default=None, repr=False)  # given for plan files (no checkpoint)

    @property
    def spec(self) -> ModelSpec | None:
        return self.checkpoint.spec if self.checkpoint is not None else None

    @property
    def relu_count(self) -> int:
        return relu_count(self.spec) if self.spec is not None else self.plan.relu_count

    @property
    def input_shape(self) -> tuple[int, int, int]:
        if self.spec is None:
            return tuple(self.plan.input_shape)
        return self.spec.in_channels, self.spec.input_size, self.spec.input_size

    def plaintext(self, x: torch.Tensor) -> torch.Tensor:
        """The reference logits: the PyTorch model, or the plan in plaintext for a plan file."""
        if self.checkpoint is not None:
            return plaintext_logits(self.checkpoint, x)
        return run_plaintext(self.plan, x).double()

    @property
    def plan(self) -> SecurePlan:
        if self._plan is None:
            self._plan = plan_from_checkpoint(self.checkpoint)
        return self._plan


def random_model(name: str, spec: ModelSpec, seed: int = 0) -> BenchModel:
    return BenchModel(name, random_checkpoint(spec, seed=seed), f"random weights (seed {seed})")


# -- which models ---------------------------------------------------------------------------------

def golden_models(quick: bool = False, base: ModelSpec | None = None, full: bool = True) -> list[BenchModel]:
    """The full ResNet18 and the golden DeepReDuce specs, random weights; `base` sets the data shape."""
    base = base or ModelSpec()
    shape = dict(num_classes=base.num_classes, in_channels=base.in_channels, input_size=base.input_size)
    models = [full_resnet18(base)] if full else []
    for i, (name, fields) in enumerate(GOLDEN_SPECS.items(), start=1):
        if not quick or name in QUICK_GOLDEN:
            models.append(random_model(name, ModelSpec(**shape, **fields), seed=i))
    return models


def full_resnet18(base: ModelSpec | None = None) -> BenchModel:
    base = base or ModelSpec()
    spec = ModelSpec(arch="resnet18", alpha=1.0, num_classes=base.num_classes, in_channels=base.in_channels,
                     input_size=base.input_size)
    return random_model(FULL_RESNET18, spec, seed=0)


def frontier_models(out_dir: str, quick: bool = False, full: bool = True) -> list[BenchModel]:
    """The frontier of a `deepreduce optimize` run (trained checkpoints), plus the full ResNet18 of
    the same data shape (random weights). `quick`: only the largest frontier model under 100K ReLUs."""
    from deepreduce.optimize.report import load_frontier
    doc = load_frontier(out_dir)
    points = sorted(doc.get("frontier", []), key=lambda p: p["relu_count"])
    if not points:
        raise UserError(f"{out_dir}/frontier.json has no frontier points: finish `deepreduce optimize` first")
    if quick:
        small = [p for p in points if p["relu_count"] < QUICK_RELU_LIMIT]
        if not small:
            raise UserError(f"--quick needs a frontier model under {QUICK_RELU_LIMIT:,} ReLUs; "
                            f"{out_dir} has none (run without --quick)")
        points = small[-1:]
    models = []
    for p in points:
        path = os.path.join(out_dir, p["checkpoint"])
        models.append(BenchModel(p["name"], load_checkpoint(path), path, accuracy=p.get("accuracy")))
    if full:
        models.insert(0, full_resnet18(models[0].spec))
    return models


def plan_file_models(paths: list[str]) -> list[BenchModel]:
    """Secure plans as they are (no checkpoint: the baseline is the CrypTen reference engine)."""
    models = []
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"plan {path} does not exist: pass a MODEL.plan written by `deepreduce export`")
        models.append(BenchModel(os.path.splitext(os.path.basename(path))[0], None, path, _plan=SecurePlan.load(path)))
    return models


def spec_file_models(paths: list[str], full: bool = True) -> list[BenchModel]:
    models = [random_model(os.path.splitext(os.path.basename(p))[0], ModelSpec.load(p), seed=i)
              for i, p in enumerate(paths, start=1)]
    if full:
        models.insert(0, full_resnet18(models[0].spec))
    return models


# -- measurements -----------------------------------------------------------------------------------

def bench_inputs(shape: tuple[int, int, int], batch_size: int, repeats: int) -> list[torch.Tensor]:
    """Normalised-scale random inputs of C x H x W `shape`, one batch per repeat (the same for both runtimes)."""
    return [torch.randn(batch_size, *shape, generator=torch.Generator().manual_seed(1000 + r))
            for r in range(repeats)]


def measure_stock(model: BenchModel, batch_size: int, repeats: int, timeout_s: float = 300,
                  warmup: int = DEFAULT_WARMUP) -> dict:
    """One stock CrypTen session answering `warmup` + `repeats` queries, the first `warmup` not
    counted; online time measured at the client, traffic and rounds at the server."""
    if model.checkpoint is None:  # a plan file: CrypTen's MPC tensors on the plan (the reference engine)
        return {**measure_ours(model, batch_size, repeats, timeout_s, "crypten", warmup), "baseline": "reference engine"}
    batches = bench_inputs(model.input_shape, batch_size, warmup + repeats)
    run = run_stock_local(model.checkpoint, batches, timeout_s=timeout_s)
    error = max(float((got - plaintext_logits(model.checkpoint, x)).abs().max())
                for got, x in zip(run.logits, batches))
    online = [q["online_s"] for q in run.client["queries"]][warmup:]  # the client: input encryption .. logits
    servers = run.server["queries"][warmup:]
    return _figures(online, servers, run.server["offline_s"], batch_size, error,
                    extra={"convert_s": run.server["convert_s"], "queries_per_session": warmup + repeats,
                           "warmup": warmup, "online_measured_at": "client"})


def measure_ours(model: BenchModel, batch_size: int, repeats: int, timeout_s: float = 300,
                 engine: str | None = None, warmup: int = DEFAULT_WARMUP, link: Link = LAN,
                 relu_protocol: str | None = None) -> dict:
    """`warmup` + `repeats` sessions of the project's runtime, one batch each, the first `warmup`
    not counted; figures of the server party. `link`: an emulated link between the parties (LAN: none).
    `relu_protocol`: the fast engine's ReLU protocol (None: the harness's default)."""
    from secure.tools.local import run_local_parties
    kwargs = {"engine": engine} if engine else {}
    if link.emulated:
        kwargs["link"] = link
    if relu_protocol is not None:
        kwargs["relu_protocol"] = relu_protocol
    online, servers, offline, error, engines, relus = [], [], [], 0.0, set(), set()
    for r, x in enumerate(bench_inputs(model.input_shape, batch_size, warmup + repeats)):
        run = run_local_parties(model.plan, x, timeout_s=timeout_s, **kwargs)
        error = max(error, float((run.client.logits - model.plaintext(x)).abs().max()))
        if r < warmup:
            continue
        p = run.server.profile
        online.append(p.online_s)
        offline.append(getattr(p, "offline_s", p.setup_s))
        servers.append({k: getattr(p, k) for k in ("online_s", "bytes_sent", "bytes_received", "rounds",
                                                    "relu_s", "linear_s")})
        engines.add(p.engine)
        relus.add(p.relu_protocol)
    return _figures(online, servers, statistics.median(offline), batch_size, error,
                    extra={"engine": ",".join(sorted(engines)), "relu_protocol": ",".join(sorted(relus)) or None,
                           "queries_per_session": 1, "warmup": warmup,
                           "online_measured_at": "server", "link": link.to_dict()})


def _figures(online: list[float], servers: list[dict], offline_s: float, batch_size: int, error: float,
             extra: dict) -> dict:
    """The per-image figures of one runtime on one model and batch size."""
    first = servers[0]  # traffic and rounds do not depend on the input: the same for every repeat
    relu_share = statistics.median(s["relu_s"] / max(s["online_s"], 1e-12) for s in servers)
    online_s = statistics.median(online) / batch_size
    return {"online_s": online_s,
            "offline_s": offline_s / batch_size,
            "mb": (first["bytes_sent"] + first["bytes_received"]) / 1e6 / batch_size,
            "rounds": int(first["rounds"]),
            "relu_share": relu_share, "linear_share": 1.0 - relu_share,
            "mb_sent": first["bytes_sent"] / 1e6 / batch_size,
            "mb_received": first["bytes_received"] / 1e6 / batch_size,
            "online_s_runs": [t / batch_size for t in online],
            "max_abs_error": error, **extra}


def projections(figures: dict, batch_size: int) -> dict:
    """{link: seconds per image} from the measured figures (secure.tools.netmodel; {} without it)."""
    if predict_latency is None:
        return {}
    profile = {"online_s": figures["online_s"] * batch_size, "batch_size": batch_size,
               "bytes_sent": figures["mb_sent"] * 1e6 * batch_size,
               "bytes_received": figures["mb_received"] * 1e6 * batch_size, "rounds": figures["rounds"]}
    return {name: predict_latency(profile, link.bandwidth_bps, link.rtt_s) / batch_size
            for name, link in PROJECTIONS.items()}


STOCK_SKIPPED = ("skipped: stock CrypTen meets over gloo, whose sockets the link emulator cannot relay; "
                 "only this runtime ran over the emulated link")


def run_bench(models: list[BenchModel], batch_sizes: list[int], repeats: int, timeout_s: float = 300,
              engine: str | None = None, progress: bool = True, log=print, warmup: int = DEFAULT_WARMUP,
              link: Link = LAN, relu_protocol: str | None = None) -> dict:
    """Measure every model at every batch size with both runtimes; returns the report document
    (without "command" and "machine", which `bench_command` adds). With an emulated `link`, ours runs
    over it and stock is skipped (recorded as {"skipped": reason}). `relu_protocol`: ours' ReLU protocol
    choice, auto, gmw, fss, fss-exact or both (one entry per protocol, stock measured once); None: the harness's
    default, unchanged."""
    if link.emulated and (engine or DEFAULT_ENGINE) != "fast":
        raise UserError(f"--link emulates the fast engine's links only; --engine {engine} meets over gloo")
    if relu_protocol is not None:
        check_relu_choice(relu_protocol, engine or DEFAULT_ENGINE)
    started = time.perf_counter()
    entries, failures = [], []
    jobs = [(m, b) for m in models for b in batch_sizes]
    per_job = 1 + (2 if relu_protocol == "both" else 1)
    bar = tqdm(total=len(jobs) * per_job, desc="bench", unit="run", disable=not progress, file=sys.stderr)
    picked: dict[str, list] = {}  # model name -> its ReLU protocols (auto: resolved once per model)
    try:
        for model, batch in jobs:
            if model.name not in picked:
                picked[model.name] = [None] if relu_protocol is None else relu_protocols(
                    relu_protocol, model.plan.public_info(), engine or DEFAULT_ENGINE, link)
                note = relu_choice_note(relu_protocol or "", picked[model.name], link, what=model.name)
                if note:
                    log(note)
            protocols = picked[model.name]
            stock_figures = None
            for protocol in protocols:
                entry = _bench_entry(model, batch, protocol, stock_figures, repeats, timeout_s, engine, warmup, link,
                                     failures, log, bar, several=len(protocols) > 1)
                stock_figures = entry["stock"]
                entries.append(entry)
    finally:
        bar.close()
    return {"format_version": BENCH_FORMAT_VERSION, "kind": BENCH_KIND,
            "link": link.to_dict(),
            "settings": {"batch_sizes": batch_sizes, "repeats": repeats, "warmup": warmup, "timeout_s": timeout_s,
                         "engine": engine or "runtime default",
                         "relu_protocol": relu_protocol or "runtime default",
                         "link": link.spec,
                         "setting": "semi-honest, 2 parties + dealer (stock: CrypTen TTP), all on 127.0.0.1, "
                                    "one process per party"
                                    + (f"; {link.describe()} between the parties (ours only; stock skipped)"
                                       if link.emulated else ""),
                         "stock": "crypten.nn.from_pytorch (batch-norm in), model.encrypt(src=0), input src=1; "
                                  "one session, `warmup` + `repeats` queries, the first `warmup` not counted; "
                                  "online at the client. For a plan file (no PyTorch model): CrypTen's MPC "
                                  "tensors on the plan (the reference engine), as `ours` is run",
                         "ours": "secure.tools.local.run_local_parties on the exported plan; one session per query, "
                                 "the first `warmup` not counted; "
                                 "figures of the server party",
                         "units": "online_s, offline_s: seconds per image (online: median over repeats); "
                                  "mb: online MB per image sent + received by the server party; "
                                  "rounds: online rounds per batch; speedup: stock online_s / ours online_s"},
            "links": {name: {"bandwidth_bps": link.bandwidth_bps, "rtt_s": link.rtt_s,
                             "description": link.description} for name, link in PROJECTIONS.items()},
            "models": entries, "failures": failures, "wall_s": time.perf_counter() - started}


def _bench_entry(model: BenchModel, batch: int, protocol: str | None, stock_figures: dict | None, repeats: int,
                 timeout_s: float, engine: str | None, warmup: int, link: Link, failures: list, log, bar,
                 several: bool) -> dict:
    """One model at one batch size with ours on one ReLU protocol (None: the harness default); stock is
    measured unless `stock_figures` (the same model and batch, another protocol) are given."""
    entry = {"name": model.name, "relu_count": model.relu_count, "batch_size": batch,
             "source": model.source, "spec": model.spec.to_dict() if model.spec else None,
             "plan_hash": model.plan.plan_hash, "comparison_count": model.plan.comparison_count,
             "relu_protocol": protocol}
    if model.accuracy is not None:
        entry["accuracy"] = model.accuracy
    for runtime in RUNTIMES:
        if runtime == "stock" and stock_figures is not None:
            entry[runtime] = dict(stock_figures)
            continue
        label = f"{model.name} batch {batch} {runtime}" + (f" ({protocol})" if runtime == "ours" and several else "")
        bar.set_description(f"{model.name} b{batch} {runtime}" + (f" {protocol}" if runtime == "ours" and protocol
                                                                   else ""))
        extra = {} if protocol is None else {"relu_protocol": protocol}
        try:
            if runtime == "stock" and link.emulated:
                entry[runtime] = {"skipped": STOCK_SKIPPED}
            elif runtime == "stock":
                entry[runtime] = measure_stock(model, batch, repeats, timeout_s, warmup)
            elif link.emulated:
                entry[runtime] = measure_ours(model, batch, repeats, timeout_s, engine, warmup, link=link, **extra)
            else:
                entry[runtime] = measure_ours(model, batch, repeats, timeout_s, engine, warmup, **extra)
        except (RuntimeError, OSError) as exc:  # SecureSessionError: a party failed or timed out
            message = " ".join(f"{type(exc).__name__}: {exc}".split())[:2000]
            entry[runtime] = {"error": message}
            failures.append(label)
            log(f"warning: {label} failed: {message[:300]}")
        bar.update(1)
    if protocol is None:  # the harness's default: what the profiles say ran
        entry["relu_protocol"] = entry["ours"].get("relu_protocol")
    _compare(entry, batch)
    return entry


def _compare(entry: dict, batch: int) -> None:
    """The entry's speedup and projections, from its stock and ours figures."""
    stock, ours = entry["stock"], entry["ours"]
    ok = _ran(stock) and _ran(ours)
    entry["speedup"] = stock["online_s"] / ours["online_s"] if ok and ours["online_s"] > 0 else None
    entry["projections"] = {}
    if ok:
        ps, po = projections(stock, batch), projections(ours, batch)
        entry["projections"] = {name: {"stock_s": ps[name], "ours_s": po[name],
                                       "speedup": ps[name] / po[name] if po[name] > 0 else None}
                                for name in ps}


# -- reports ------------------------------------------------------------------------------------------

def _ran(d: dict) -> bool:
    return "error" not in d and "skipped" not in d


def link_line(doc: dict) -> str:
    """The first line of every table: which link the figures were measured on."""
    link = doc.get("link") or LAN.to_dict()
    return f"link: {link['description']}" + (" -- stock CrypTen skipped" if link.get("emulated") else "")


def format_table(doc: dict) -> str:
    head = (f"{'model':<22} {'ReLUs':>9} {'batch':>5} {'ReLU':>5} | {'online s/img':>25} {'speedup':>8} | "
            f"{'offline s/img':>15} | {'MB/img':>15} | {'rounds/batch':>13} | {'ReLU share':>11}")
    sub = (f"{'':<22} {'':>9} {'':>5} {'proto':>5} | {'stock':>12} {'ours':>12} {'':>8} | {'stock':>7} {'ours':>7} | "
           f"{'stock':>7} {'ours':>7} | {'stock':>6} {'ours':>6} | {'stock':>5} {'ours':>5}")
    lines = [link_line(doc), head, sub, "-" * len(head)]
    for e in doc["models"]:
        s, o = e["stock"], e["ours"]
        lines.append(f"{e['name'][:22]:<22} {e['relu_count']:>9,} {e['batch_size']:>5} "
                     f"{e.get('relu_protocol') or '-':>5} | "
                     f"{_f(s, 'online_s', '.3f'):>12} {_f(o, 'online_s', '.3f'):>12} "
                     f"{_num(e['speedup'], '.1f', 'x'):>8} | "
                     f"{_f(s, 'offline_s', '.2f'):>7} {_f(o, 'offline_s', '.2f'):>7} | "
                     f"{_f(s, 'mb', '.1f'):>7} {_f(o, 'mb', '.1f'):>7} | "
                     f"{_f(s, 'rounds', 'd'):>6} {_f(o, 'rounds', 'd'):>6} | "
                     f"{_f(s, 'relu_share', '.0%'):>5} {_f(o, 'relu_share', '.0%'):>5}")
    return "\n".join(lines)


def format_projections(doc: dict) -> str:
    if (doc.get("link") or {}).get("emulated"):
        return ("(no LAN/WAN projections: this run was measured over an EMULATED link; "
                "`python -m secure.measure --link ...` puts an emulated run next to its projection)")
    names = list(doc.get("links", {}))
    if not names:
        return "(no LAN/WAN projections: secure.tools.netmodel is not available)"
    lines = ["projected online latency per image (secure.tools.netmodel: compute + rounds x RTT + bytes / bandwidth):"]
    for name, link in doc["links"].items():
        lines.append(f"  {name}: {link['description']}")
    head = f"{'model':<22} {'batch':>5} {'proto':>5} " + " ".join(
        f"| {name + ' stock':>11} {name + ' ours':>10} {'speedup':>8} " for name in names)
    lines += [head, "-" * len(head)]
    for e in doc["models"]:
        row = f"{e['name'][:22]:<22} {e['batch_size']:>5} {e.get('relu_protocol') or '-':>5} "
        for name in names:
            p = e.get("projections", {}).get(name)
            row += (f"| {p['stock_s']:>10.3f}s {p['ours_s']:>9.3f}s {_num(p['speedup'], '.1f', 'x'):>8} " if p
                    else f"| {'-':>11} {'-':>10} {'-':>8} ")
        lines.append(row)
    return "\n".join(lines)


def _f(d: dict, key: str, fmt: str) -> str:
    return "failed" if "error" in d else "skipped" if "skipped" in d else _num(d.get(key), fmt)


def _num(value, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, fmt) + suffix


def plot_bench(doc: dict, path: str) -> None:
    """Online latency per image against ReLU count, both runtimes, one line per batch size (and, for
    ours, per ReLU protocol when the report has several); log axes (a model without ReLUs is drawn at 1 ReLU)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    styles = {"stock": ("tab:red", "s"), "ours": ("tab:blue", "o")}
    batches = sorted({e["batch_size"] for e in doc["models"]})
    protocols = sorted({e.get("relu_protocol") or "" for e in doc["models"]}, key=lambda p: (p != "gmw", p))
    ours_colors = ("tab:blue", "tab:green", "tab:purple")
    lines = [("stock", None, *styles["stock"])] + [
        ("ours", proto if len(protocols) > 1 else None, ours_colors[k % len(ours_colors)], "o")
        for k, proto in enumerate(protocols)]
    for runtime, proto, color, marker in lines:
        for i, batch in enumerate(batches):
            points = sorted({(max(1, e["relu_count"]), e[runtime]["online_s"], e["name"]) for e in doc["models"]
                             if e["batch_size"] == batch and _ran(e[runtime])
                             and (proto is None or (e.get("relu_protocol") or "") == proto)})
            if not points:
                continue
            label = (f"{'stock CrypTen' if runtime == 'stock' else 'this runtime'}"
                     + (f" ({proto or 'default'} ReLU)" if proto is not None else "") + f", batch {batch}")
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, color=color,
                    linestyle="-" if i == 0 else "--", alpha=1.0 if i == 0 else 0.6, label=label)
            if runtime == "stock" and i == 0:
                for x, y, name in points:
                    ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("ReLUs per image (log scale; 0 drawn at 1)")
    ax.set_ylabel("online latency per image (s, log scale)")
    link = doc.get("link") or {}
    ax.set_title("Private inference: stock CrypTen vs this runtime (2 parties + dealer, "
                 + (f"EMULATED link {link['spec']})" if link.get("emulated") else "loopback)"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_output(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def machine_info() -> dict:
    info = {"hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    for package in ("crypten", "deepreduce-pi"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                                     None)
    except OSError:
        info["cpu_model"] = None
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        info["memory_gb"] = round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        info["memory_gb"] = None
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# -- the command --------------------------------------------------------------------------------------

QUICK_REPEATS = 2
DEFAULT_REPEATS = 3
DEFAULT_BATCH_SIZES = (1, 8)


@dataclass
class BenchSettings:
    """What `deepreduce bench` measures; None picks the default (which --quick changes)."""
    frontier: str | None = None  # an optimize run's directory: its frontier models
    spec_files: list[str] = field(default_factory=list)  # ModelSpec JSON files, random weights
    plan_files: list[str] = field(default_factory=list)  # secure plans as they are (e.g. exported modules)
    full: bool = True  # add the full ResNet18 (alpha 1)
    batch_sizes: list[int] | None = None
    repeats: int | None = None
    warmup: int | None = None
    quick: bool = False
    engine: str | None = None  # this runtime's engine; None: the runtime's default
    relu_protocol: str = DEFAULT_TOOL_RELU_CHOICE  # ours' ReLU protocol: auto, gmw, fss, fss-exact or both
    link: Link = LAN  # an emulated link between the parties (secure.tools.linkemu); LAN: none
    timeout_s: float = 300.0
    json_out: str | None = None
    plot: str | None = None
    progress: bool = True


def bench_command(args: BenchSettings, argv: list[str] | None = None, log=print) -> dict:
    """What `deepreduce bench` does. Returns the report."""
    batch_sizes = args.batch_sizes if args.batch_sizes is not None else [1] if args.quick else list(DEFAULT_BATCH_SIZES)
    repeats = args.repeats if args.repeats is not None else QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    warmup = DEFAULT_WARMUP if args.warmup is None else args.warmup
    if warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {warmup}")
    if any(b < 1 for b in batch_sizes) or not batch_sizes:
        raise UserError(f"--batch-sizes must be positive integers, got {','.join(map(str, batch_sizes))}")
    if args.timeout_s <= 0:
        raise UserError(f"--timeout must be positive, got {args.timeout_s:g}")
    if sum(map(bool, (args.frontier, args.spec_files, args.plan_files))) > 1:
        raise UserError("pass one of --frontier DIR, --spec FILE or --plan FILE")
    if args.engine and args.engine not in ENGINES:
        raise UserError(f"unknown --engine {args.engine!r}: choose one of {', '.join(ENGINES)}")
    if not isinstance(args.link, Link):
        raise TypeError(f"BenchSettings.link must be a secure.tools.linkemu.Link, got {type(args.link).__name__}")
    if args.link.emulated and (args.engine or DEFAULT_ENGINE) != "fast":
        raise UserError(f"--link emulates the fast engine's links only; --engine {args.engine} meets over gloo")
    check_relu_choice(args.relu_protocol, args.engine or DEFAULT_ENGINE)
    for path in (args.json_out, args.plot):
        _check_writable(path)
    full = args.full
    if args.frontier:
        models = frontier_models(args.frontier, quick=args.quick, full=full)
    elif args.spec_files:
        models = spec_file_models(args.spec_files, full=full)
    elif args.plan_files:
        models = plan_file_models(args.plan_files)
    else:
        models = golden_models(quick=args.quick, full=full)
    if not models:
        raise UserError("no models to benchmark (--no-full without --spec or --frontier)")
    log(f"benchmarking {len(models)} model(s) x batch {','.join(map(str, batch_sizes))}, {repeats} repeat(s) each "
        f"after {warmup} warm-up, {args.link.describe()}, --relu-protocol {args.relu_protocol}"
        + (" (stock CrypTen skipped)" if args.link.emulated else "") + ": "
        + ", ".join(f"{m.name} ({m.relu_count:,} ReLUs)" for m in models))
    machine = machine_info()
    doc = run_bench(models, batch_sizes, repeats, timeout_s=args.timeout_s, engine=args.engine,
                    progress=args.progress, log=log, warmup=warmup, link=args.link, relu_protocol=args.relu_protocol)
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    command = "deepreduce " + (shlex.join(argv) if argv is not None else "bench")
    doc = {"format_version": doc.pop("format_version"), "kind": doc.pop("kind"), "command": command,
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "quick": bool(args.quick), "machine": machine, **doc}
    log(format_table(doc))
    log("")
    log(format_projections(doc))
    log(f"\n{len(doc['models'])} measurements in {doc['wall_s']:.0f} s (load average {machine.get('load_average')}"
        f" -> {machine.get('load_average_end')})")
    if args.json_out:
        atomic_write_json(args.json_out, doc)
        log(f"wrote {args.json_out}")
    if args.plot:
        plot_bench(doc, args.plot)
        log(f"wrote {args.plot}")
    if doc["failures"]:
        runs = len(doc["models"]) + len({(e["name"], e["batch_size"]) for e in doc["models"]})  # stock once
        raise UserError(f"{len(doc['failures'])} of {runs} runs failed "
                        f"({'; '.join(doc['failures'])}); the messages are in the report above"
                        + (f" and in {args.json_out}" if args.json_out else ""))
    return doc


def _check_writable(path: str | None) -> None:
    """Fail before an hour of measurements, not after."""
    if not path:
        return
    directory = os.path.dirname(os.path.abspath(path)) or "."
    existing = directory
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise UserError(f"cannot write {path}: {existing} is not a writable directory")
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory: pass a file name")
