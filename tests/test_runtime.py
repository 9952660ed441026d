"""The two-party runtime: secure logits == plaintext on real CIFAR-10 images, roles, profiles, for the
fast engine (the default, secure/core/engine.py) and the CrypTen reference engine.

Every secure run spawns fresh party processes (CrypTen's state and gloo's process group are
process-global), so this test process never initialises either itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deepreduce.checkpoint import random_checkpoint
from deepreduce.data import normalize
from deepreduce.graph import Op
from deepreduce.spec import ModelSpec
from secure.core.export import plan_from_checkpoint
from secure.core.plaintext import run_plaintext
from secure.core.plan import SecurePlan
from secure.core.runtime import ROLES, SecureSessionError
from secure.tools.local import run_local_parties

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-2


def real_batch(cifar10, plan, picks: list[int]) -> torch.Tensor:
    """Real CIFAR-10 test images of different classes, normalised for the plan."""
    labels = cifar10.test.labels.numpy()
    index = [int(np.flatnonzero(labels == c)[i]) for i, c in enumerate(picks)]
    return normalize(cifar10.test.images[index], plan.mean, plan.std)


@pytest.fixture(scope="module")
def ttp_run(cifar10):
    """3 images as two queries (2 + 1) of one session through server + client + dealer."""
    plan = plan_from_checkpoint(random_checkpoint(ModelSpec(alpha=0.25, cull=(1,), thin="bottom"), seed=11))
    x = real_batch(cifar10, plan, [3, 0, 8])
    return plan, x, run_local_parties(plan, x, timeout_s=120, batch_size=2)


@pytest.fixture(scope="module")
def tfp_run(cifar10):
    """One image in insecure TFP mode (no dealer), on a differently thinned model."""
    plan = plan_from_checkpoint(random_checkpoint(ModelSpec(alpha=0.25, thin="top", cull=(4,)), seed=12))
    x = real_batch(cifar10, plan, [5])
    return plan, x, run_local_parties(plan, x, insecure_tfp=True, timeout_s=120)


@pytest.fixture(scope="module")
def crypten_run(cifar10):
    """The CrypTen reference engine (MPC tensors, CrypTen's TTP provider), batch of 2."""
    plan = plan_from_checkpoint(random_checkpoint(ModelSpec(alpha=0.25, cull=(1,), thin="bottom"), seed=11))
    x = real_batch(cifar10, plan, [3, 0])
    return plan, x, run_local_parties(plan, x, timeout_s=120, engine="crypten")


def assert_matches_plaintext(plan, x, logits):
    expected = run_plaintext(plan, x)
    assert logits.dtype == torch.float64 and logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= TOLERANCE
    assert torch.equal(logits.argmax(1), expected.argmax(1))
    assert expected.std().item() > 0.05  # not a degenerate all-equal output


@pytest.mark.slow
def test_secure_logits_match_plaintext_two_queries_in_one_session(ttp_run):
    plan, x, run = ttp_run
    assert_matches_plaintext(plan, x, run.client.logits)
    assert run.server.profile.queries == run.client.profile.queries == 2
    assert run.server.profile.engine == "fast"


@pytest.mark.slow
def test_crypten_reference_engine_matches_plaintext(crypten_run):
    plan, x, run = crypten_run
    assert_matches_plaintext(plan, x, run.client.logits)
    assert run.server.profile.engine == "crypten"
    assert all(lp.rounds >= 9 for lp in run.server.profile.layers if lp.op == "relu")


@pytest.mark.slow
def test_output_is_revealed_to_the_client_only(ttp_run):
    _, _, run = ttp_run
    assert run.server.role == "server" and run.server.logits is None
    assert run.client.role == "client" and run.client.logits is not None


@pytest.mark.slow
def test_dealer_is_a_separate_process_serving_the_server(ttp_run):
    _, _, run = ttp_run
    assert ROLES == {"server": 0, "client": 1, "dealer": 2}
    assert len(set(run.pids.values())) == 3 and set(run.pids) == {"server", "client", "dealer"}
    assert not run.client.insecure_tfp and not run.server.insecure_tfp
    assert not run.client.profile.insecure_tfp and not run.server.profile.insecure_tfp
    # The dealer works offline: it sends the server its correlations and the client a seed, and
    # nothing during the online phase, where the two parties only talk to each other.
    assert run.dealer["bytes_sent"] > 0
    assert run.server.profile.offline_bytes > run.dealer["bytes_sent"]
    assert run.server.profile.bytes_received == run.client.profile.bytes_sent
    assert run.server.profile.bytes_sent == run.client.profile.bytes_received


@pytest.mark.slow
def test_profiles_are_consistent(ttp_run):
    plan, x, run = ttp_run
    for result in (run.server, run.client):
        p = result.profile
        assert p.batch_size == len(x)
        assert p.bytes_sent > 0 and p.bytes_received > 0 and p.rounds > 0
        assert p.setup_s > 0 and p.online_s > 0 and p.total_s == pytest.approx(p.setup_s + p.online_s)
        assert p.offline_s >= p.setup_s
        assert [lp.name for lp in p.layers] == [op.name for op in plan.ops[1:]] + ["output"]
        assert p.relu_s + p.linear_s == pytest.approx(p.online_s)
        assert p.relu_bytes + p.linear_bytes == p.bytes_sent + p.bytes_received
        assert sum(lp.rounds for lp in p.layers) == p.rounds
        assert p.relu_count == plan.relu_count * len(x)
        for lp in p.layers:  # summed over the session's 2 queries
            if lp.op == "relu":  # first AND, log2(32) carry levels, the multiplexer: 7 rounds a query
                assert lp.rounds == 2 * 7 and lp.bytes_sent > 0 and lp.relu_count > 0
                # bit-packed: far below CrypTen's ~232 bytes sent per ReLU and party
                assert lp.bytes_sent / lp.relu_count < 30
            elif lp.op in ("add", "avgpool"):  # local on shares
                assert lp.rounds == 0 and lp.bytes_sent == lp.bytes_received == 0
            elif lp.op in ("conv", "linear"):  # the client's masked input, unless it was known offline
                assert lp.rounds in (0, 2)
        # The whole session over TLS links: the online bytes are part of it, and the wire carries every
        # payload byte plus TLS records, frame headers and the handshakes (a few kB: under 10% here).
        assert p.session_bytes_sent >= p.bytes_sent and p.session_bytes_received >= p.bytes_received
        payload = p.session_bytes_sent + p.session_bytes_received
        assert payload < p.wire_bytes_sent + p.wire_bytes_received < 1.1 * payload + 20_000
        assert p.wire_bytes_sent > p.session_bytes_sent and p.wire_bytes_received > p.session_bytes_received
        json.dumps(p.to_dict())
    # The only opening of the output goes to the client.
    assert run.server.profile.layers[-1].bytes_sent > 0 and run.server.profile.layers[-1].bytes_received == 0
    assert run.client.profile.layers[-1].bytes_received > 0 and run.client.profile.layers[-1].bytes_sent == 0


@pytest.mark.slow
def test_insecure_tfp_is_marked_and_still_correct(tfp_run):
    plan, x, run = tfp_run
    assert_matches_plaintext(plan, x, run.client.logits)
    assert run.dealer is None and set(run.pids) == {"server", "client"}
    for result in (run.server, run.client):
        assert result.insecure_tfp and result.profile.insecure_tfp
    # Without a dealer the two parties only talk to each other: what one sends, the other receives.
    assert run.client.profile.bytes_sent == run.server.profile.bytes_received
    assert run.client.profile.bytes_received == run.server.profile.bytes_sent


MISSING_SERVER = """
import time, torch
from deepreduce.spec import ModelSpec
from secure.core.export import plan_from_checkpoint
from deepreduce.checkpoint import random_checkpoint
from secure.control.protocol import free_port
from secure.core.runtime import Rendezvous, SecureSessionError, run_client
plan = plan_from_checkpoint(random_checkpoint(ModelSpec(alpha=0.25, blocks=(1, 1, 1, 1))))
start = time.monotonic()
try:
    run_client(plan.public_info(), [torch.zeros(1, 3, 32, 32)], Rendezvous("127.0.0.1", free_port(), 2.0))
except SecureSessionError as exc:
    print("raised", round(time.monotonic() - start, 1), exc)
"""


@pytest.mark.slow
def test_a_missing_server_times_out_instead_of_hanging():
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", MISSING_SERVER], cwd=ROOT, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("raised") and "rendezvous" in out.stdout
    assert float(out.stdout.split()[1]) < 30
    assert time.monotonic() - start < 200


@pytest.mark.slow
def test_client_with_another_plan_is_refused(cifar10):
    server_plan = plan_from_checkpoint(random_checkpoint(ModelSpec(alpha=0.25, blocks=(1, 1, 1, 1)), seed=1))
    stale_plan = plan_from_checkpoint(random_checkpoint(ModelSpec(alpha=0.25, blocks=(1, 1, 1, 1)), seed=2))
    x = real_batch(cifar10, server_plan, [1])
    with pytest.raises(SecureSessionError, match="disagree"):
        run_local_parties(server_plan, x, timeout_s=60, client_public=stale_plan.public_info())


def relu_probe_plan(channels: int = 16) -> SecurePlan:
    """logits = ReLU(x) elementwise: identity 1x1 conv, ReLU, (1x1) average pool, identity linear."""
    eye = torch.eye(channels)
    ops = [{"id": 0, "op": "input", "name": "input", "inputs": [], "shape": [channels, 1, 1]},
           {"id": 1, "op": "conv", "name": "conv", "inputs": [0], "shape": [channels, 1, 1], "weight": "c.w",
            "bias": "c.b", "stride": [1, 1], "padding": [0, 0]},
           {"id": 2, "op": "relu", "name": "relu", "inputs": [1], "shape": [channels, 1, 1], "site": "relu",
            "relu_count": channels},
           {"id": 3, "op": "avgpool", "name": "pool", "inputs": [2], "shape": [channels]},
           {"id": 4, "op": "linear", "name": "fc", "inputs": [3], "shape": [channels], "weight": "f.w", "bias": "f.b"}]
    tensors = {"c.w": eye.view(channels, channels, 1, 1).contiguous(), "c.b": torch.zeros(channels),
               "f.w": eye.clone(), "f.b": torch.zeros(channels)}
    return SecurePlan([Op.from_dict(op) for op in ops], tensors, (channels, 1, 1), [str(i) for i in range(channels)], [0.0] * channels,
                      [1.0] * channels, {}, channels)


@pytest.mark.slow
def test_secure_relu_at_the_edges_of_its_range():
    """Zero, values around the fixed-point resolution (2^-12), and up to 2^19 (the sign test reads 32
    bits above the resolution): ReLU must be exact up to the encoding's rounding, over 2 queries."""
    values = torch.tensor([0.0, 2**-12, -2**-12, 3 * 2**-12, -3 * 2**-12, 1e-3, -1e-3, 0.5, -0.5, 1.0, -1.0,
                           37.25, -37.25, 4096.0, -4096.0, 2.0**19 - 1])
    x = torch.stack([values, values.flip(0) * 0.731]).view(2, 16, 1, 1)
    run = run_local_parties(relu_probe_plan(), x, timeout_s=120, batch_size=1)
    expected = x.view(2, 16).double().clamp(min=0)
    assert (run.client.logits - expected).abs().max().item() <= 2 * 2**-12


@pytest.mark.slow
def test_shipped_model_on_its_demo_images_agrees_with_plaintext():
    """Real weights, real images: every argmax equal and logits within the project tolerance."""
    from deepreduce.data import load_image_files
    plan = SecurePlan.load(str(ROOT / "demo" / "model.plan"))
    paths = sorted(str(p) for p in (ROOT / "demo" / "images").glob("*.png"))
    x = normalize(load_image_files(paths, plan.input_shape[0], plan.input_shape[1]), plan.mean, plan.std)
    run = run_local_parties(plan, x, timeout_s=180, batch_size=10)
    expected = run_plaintext(plan, x)
    assert torch.equal(run.client.logits.argmax(1), expected.argmax(1))
    assert (run.client.logits - expected).abs().max().item() <= TOLERANCE


LONELY_SERVER = """
import sys, torch
from deepreduce.spec import ModelSpec
from secure.core.export import plan_from_checkpoint
from deepreduce.checkpoint import random_checkpoint
from secure.core.runtime import Rendezvous, SecureSessionError, run_server
plan = plan_from_checkpoint(random_checkpoint(ModelSpec(alpha=0.25, blocks=(1, 1, 1, 1))))
try:
    run_server(plan, Rendezvous("127.0.0.1", int(sys.argv[1]), 6.0), [1])
except SecureSessionError as exc:
    print("raised", exc)
"""


def listeners(port: int) -> set[str]:
    """Local addresses (hex, as the kernel lists them) with a listening TCP socket on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(address)
    return found


@pytest.mark.slow
def test_the_rendezvous_store_listens_on_the_session_address_only():
    """torch's c10d store would listen on every interface; the server binds it to the rendezvous host."""
    from secure.control.protocol import free_port
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", LONELY_SERVER, str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        seen, deadline = set(), time.monotonic() + 60
        while not seen and time.monotonic() < deadline and proc.poll() is None:
            seen = listeners(port)
            time.sleep(0.05)
        assert seen == {"0100007F"}, seen  # 127.0.0.1 only, no 0.0.0.0 or [::]
        out, err = proc.communicate(timeout=120)
        assert "raised" in out and "rendezvous" in out, err[-2000:]
    finally:
        proc.kill()
        proc.wait()
    assert not listeners(port)


@pytest.mark.slow
def test_a_party_that_dies_while_starting_is_reported_not_waited_for(tmp_path):
    """A script without a `__main__` guard: spawn re-runs it in each party process, which then dies
    before reading its arguments. With 32 images (393 KB) in those arguments the parent used to
    block forever on the full pipe; now it must name the dead party within its timeout."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import torch\n"
        "from deepreduce.spec import ModelSpec\n"
        "from secure.core.export import plan_from_checkpoint\n"
        "from deepreduce.checkpoint import random_checkpoint\n"
        "from secure.tools.local import run_local\n"
        "plan = plan_from_checkpoint(random_checkpoint(ModelSpec(alpha=0.25, cull=(1,), thin='bottom'), seed=1))\n"
        "run_local(plan, torch.zeros(32, 3, 32, 32), timeout_s=20)\n")
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert "SecureSessionError: party" in done.stderr and "without a result" in done.stderr
