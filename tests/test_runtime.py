"""The two-party CrypTen runtime: secure logits == plaintext on real CIFAR-10 images, roles, profiles.

Every secure run spawns fresh party processes (CrypTen's state is process-global), so this test
process never initialises CrypTen itself.
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

from deepreduce.data import normalize
from deepreduce.spec import ModelSpec
from secure.plan import plan_from_checkpoint, run_plaintext
from secure.profiling import random_checkpoint
from secure.runtime import ROLES, SecureSessionError, run_local_parties

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-2


def real_batch(cifar10, plan, picks: list[int]) -> torch.Tensor:
    """Real CIFAR-10 test images of different classes, normalised for the plan."""
    labels = cifar10.test.labels.numpy()
    index = [int(np.flatnonzero(labels == c)[i]) for i, c in enumerate(picks)]
    return normalize(cifar10.test.images[index], plan.mean, plan.std)


@pytest.fixture(scope="module")
def ttp_run(cifar10):
    """A batch of 3 through server + client + dealer (the real, TTP-backed protocol)."""
    plan = plan_from_checkpoint(random_checkpoint(ModelSpec(alpha=0.25, cull=(1,), thin="bottom"), seed=11))
    x = real_batch(cifar10, plan, [3, 0, 8])
    return plan, x, run_local_parties(plan, x, timeout_s=120)


@pytest.fixture(scope="module")
def tfp_run(cifar10):
    """One image with CrypTen's insecure TFP provider (no dealer), on a differently thinned model."""
    plan = plan_from_checkpoint(random_checkpoint(ModelSpec(alpha=0.25, thin="top", cull=(4,)), seed=12))
    x = real_batch(cifar10, plan, [5])
    return plan, x, run_local_parties(plan, x, insecure_tfp=True, timeout_s=120)


def assert_matches_plaintext(plan, x, logits):
    expected = run_plaintext(plan, x)
    assert logits.dtype == torch.float64 and logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= TOLERANCE
    assert torch.equal(logits.argmax(1), expected.argmax(1))
    assert expected.std().item() > 0.05  # not a degenerate all-equal output


@pytest.mark.slow
def test_secure_logits_match_plaintext_batch_of_3(ttp_run):
    plan, x, run = ttp_run
    assert_matches_plaintext(plan, x, run.client.logits)


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
    # The server (rank 0) fetches every triple from the dealer: what it receives beyond the
    # client's messages is exactly what the dealer sent.
    assert run.dealer["bytes_sent"] > 0
    assert run.server.profile.bytes_received == run.client.profile.bytes_sent + run.dealer["bytes_sent"]
    assert run.server.profile.bytes_sent >= run.client.profile.bytes_received


@pytest.mark.slow
def test_profiles_are_consistent(ttp_run):
    plan, x, run = ttp_run
    for result in (run.server, run.client):
        p = result.profile
        assert p.batch_size == len(x)
        assert p.bytes_sent > 0 and p.bytes_received > 0 and p.rounds > 0
        assert p.setup_s > 0 and p.online_s > 0 and p.total_s == pytest.approx(p.setup_s + p.online_s)
        assert [lp.name for lp in p.layers] == [op["name"] for op in plan.ops[1:]] + ["output"]
        assert p.relu_s + p.linear_s == pytest.approx(p.online_s)
        assert p.relu_bytes + p.linear_bytes == p.bytes_sent + p.bytes_received
        assert sum(lp.rounds for lp in p.layers) == p.rounds
        assert p.relu_count == plan.relu_count * len(x)
        for lp in p.layers:
            if lp.op == "relu":  # every ReLU needs several rounds of interaction
                assert lp.rounds >= 9 and lp.bytes_sent > 0 and lp.relu_count > 0
            elif lp.op in ("add", "avgpool"):  # local on shares
                assert lp.rounds == 0 and lp.bytes_sent == lp.bytes_received == 0
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
from secure.plan import plan_from_checkpoint
from secure.profiling import random_checkpoint
from secure.runtime import Rendezvous, SecureSessionError, free_port, run_client
plan = plan_from_checkpoint(random_checkpoint(ModelSpec(alpha=0.25, blocks=(1, 1, 1, 1))))
start = time.monotonic()
try:
    run_client(plan.public_info(), torch.zeros(1, 3, 32, 32), Rendezvous("127.0.0.1", free_port(), 2.0))
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
