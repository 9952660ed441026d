"""The fast engine's ReLU protocol choice (gmw, fss, auto; the tools' both) from every entry point to the
engine: flags and their one-line errors, the runtime's checks, the harness, the tools' reports, and the
session request through the real roles. The engine side of "fss" and `secure.core.costmodel` (auto) are
another change's: the tests here run "gmw" and stand in for the cost model where they need "auto", except
`test_fss_session_matches_plaintext`, which runs the real fss protocol."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch

from deepreduce.checkpoint import random_checkpoint
from deepreduce.errors import UserError
from deepreduce.spec import ModelSpec
from secure.control import auth, protocol
from secure.core.export import plan_from_checkpoint
from secure.core.plaintext import run_plaintext
from support.env import ROOT, subprocess_env
from support.roles import (CLIENT_FAST, IMAGES, assert_matches_plaintext, assert_one_line_error, client, plaintext,
                           security, start_dealer, start_server)

TOLERANCE = 1e-2  # logits, as in tests/test_runtime.py (16-bit fixed point)
CRYPTEN_REFUSAL = r"the crypten engine has its own ReLU protocol; --relu-protocol applies to the fast engine"


@pytest.fixture(scope="module")
def tiny_plan():
    return plan_from_checkpoint(random_checkpoint(ModelSpec(alpha=0.125, input_size=8, cull=(1, 4), thin="bottom"),
                                                  seed=3))


@pytest.fixture
def fake_costmodel(monkeypatch):
    """secure.core.costmodel stood in for: records each call, picks `picks["protocol"]`."""
    calls, picks = [], {"protocol": "gmw"}

    def resolve_relu_protocol(choice, public, rtt_s=0.0, rate_bps=None, offered=None):
        calls.append((choice, public.plan_hash, rtt_s, rate_bps))
        return choice if choice != "auto" else picks["protocol"]
    module = types.ModuleType("secure.core.costmodel")
    module.resolve_relu_protocol = resolve_relu_protocol
    monkeypatch.setitem(sys.modules, "secure.core.costmodel", module)
    return calls, picks


def demo_batch(plan, n: int) -> torch.Tensor:
    from deepreduce.data import load_image_files, normalize
    paths = [str(p) for p in IMAGES[::5][:n]]  # different classes
    return normalize(load_image_files(paths, plan.input_shape[0], plan.input_shape[1]), plan.mean, plan.std)


def assert_logits_match(plan, x, logits) -> None:
    expected = run_plaintext(plan, x)
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= TOLERANCE
    assert torch.equal(logits.argmax(1), expected.argmax(1))


def one_error_line(argv: list[str]) -> str:
    """`python ARGV...`: exit status 2, nothing on stdout, one `error: ...` line on stderr, no traceback."""
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and done.stdout == "" and len(lines) == 1, (done.returncode, done.stdout, done.stderr)
    assert lines[0].startswith("error: ")
    return lines[0]


# -- the runtime and the harness refuse what they cannot run, before anything starts ---------------------------

def test_runtime_checks_the_protocol_and_builds_the_fast_engine_with_it(tiny_plan):
    from secure.core import runtime
    from secure.core.party import Rendezvous
    assert runtime.check_relu_protocol("fss") == "fss" and runtime.check_relu_protocol("gmw", "crypten") == "gmw"
    for bad in ("auto", "both", "GMW", ""):
        with pytest.raises(ValueError, match=r"unknown ReLU protocol .*: one of gmw, fss, fss-exact"):
            runtime.check_relu_protocol(bad)
    with pytest.raises(ValueError, match=CRYPTEN_REFUSAL):
        runtime.check_relu_protocol("fss", "crypten")
    for protocol_name in ("gmw", "fss"):
        assert runtime.get_engine("fast", protocol_name).config.relu_protocol == protocol_name
    assert runtime.get_engine("fast").config.relu_protocol == "gmw"  # the default is today's protocol
    nowhere = Rendezvous("127.0.0.1", 1, timeout_s=1)  # never reached: the checks come first
    with pytest.raises(ValueError, match=CRYPTEN_REFUSAL):
        runtime.run_server(tiny_plan, nowhere, [1], engine="crypten", relu_protocol="fss")
    with pytest.raises(ValueError, match="unknown ReLU protocol 'auto'.*resolved before"):
        runtime.run_client(tiny_plan.public_info(), [torch.zeros(1, 3, 8, 8)], nowhere, relu_protocol="auto")


def test_harness_refuses_before_any_process_starts(tiny_plan):
    from secure.tools.local import run_local_parties
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match=CRYPTEN_REFUSAL):
        run_local_parties(tiny_plan, x, engine="crypten", relu_protocol="fss", timeout_s=5)
    with pytest.raises(ValueError, match="unknown ReLU protocol 'both'"):
        run_local_parties(tiny_plan, x, relu_protocol="both", timeout_s=5)


def test_tool_choices_expand_and_auto_resolves_for_the_link(tiny_plan, fake_costmodel):
    from secure.tools.linkemu import LAN, parse_link
    from secure.tools.local import relu_choice_note, relu_protocols
    calls, picks = fake_costmodel
    public = tiny_plan.public_info()
    assert relu_protocols("both", public) == ["gmw", "fss"]
    assert relu_protocols("fss", public) == ["fss"] and relu_protocols("gmw", public) == ["gmw"]
    assert calls == []  # a concrete choice asks no cost model
    assert relu_protocols("auto", public, engine="crypten") == [None]  # CrypTen's own
    picks["protocol"] = "fss"
    link = parse_link("rtt=20ms,rate=100mbit")
    assert relu_protocols("auto", public, link=link) == ["fss"]
    assert relu_protocols("auto", public) == ["fss"]
    assert calls == [("auto", tiny_plan.plan_hash, 0.02, 1e8), ("auto", tiny_plan.plan_hash, 0.0, None)]
    assert "auto picked fss" in relu_choice_note("auto", ["fss"], link) and "rtt=20ms" in relu_choice_note(
        "auto", ["fss"], link)
    assert "LAN" in relu_choice_note("auto", ["gmw"], LAN) and relu_choice_note("gmw", ["gmw"]) is None
    for choice, engine, message in (("bogus", "fast", "choose one of auto, gmw, fss, fss-exact, both"),
                                    ("fss", "crypten", CRYPTEN_REFUSAL), ("both", "crypten", CRYPTEN_REFUSAL),
                                    ("gmw", "crypten", CRYPTEN_REFUSAL)):
        with pytest.raises(UserError, match=message):
            relu_protocols(choice, public, engine=engine)


# -- flags: a bad value is one `error:` line, exit status 2, before any work ---------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--relu-protocol", "bogus"], r"--relu-protocol 'bogus': choose one of auto, gmw, fss, fss-exact$"),
    (["--relu-protocol", "both"], r"--relu-protocol 'both': choose one of auto, gmw, fss, fss-exact$"),
    (["--engine", "crypten", "--relu-protocol", "fss"], CRYPTEN_REFUSAL),
    (["--rtt-ms", "-5"], r"--rtt-ms must be at least 0 and --rate-mbit positive"),
    (["--rate-mbit", "0"], r"--rtt-ms must be at least 0 and --rate-mbit positive"),
])
def test_pi_client_relu_flags(argv, message):
    # no server listens on port 1: the flags are refused before anything is sent
    assert_one_line_error(client("infer", "--server", "127.0.0.1:1", "--connect-timeout", "1", *argv,
                                 str(IMAGES[0]), timeout=60), message)


def test_pi_client_parses_the_flags_into_its_settings():
    from client.app import build_parser, relu_line, settings_from_args
    from client.session import ClientSettings
    args = build_parser().parse_args(["infer", "--server", "127.0.0.1:7000", "--no-auth", "x.png"])
    settings = settings_from_args(args)
    assert (settings.relu_protocol, settings.link_rtt_s, settings.link_rate_bps) == ("auto", 0.0, None)
    args = build_parser().parse_args(["load", "--server", "127.0.0.1:7000", "--no-auth", "--relu-protocol", "fss",
                                      "--rtt-ms", "20", "--rate-mbit", "100", "x.png"])
    settings = settings_from_args(args)
    assert (settings.relu_protocol, settings.link_rtt_s, settings.link_rate_bps) == ("fss", 0.02, 1e8)
    base = ClientSettings(server=("127.0.0.1", 7000), security=auth.Security(None, "client"))
    assert relu_line("gmw", base) == "ReLU protocol: gmw (auto, for a LAN)"
    assert relu_line("fss", settings) == "ReLU protocol: fss (--relu-protocol fss)"
    assert relu_line(None, base) == "ReLU protocol: CrypTen's own (crypten engine)"


def test_client_resolves_auto_with_its_link_hint(tiny_plan, fake_costmodel):
    from client.session import ClientSettings, relu_protocol_for
    calls, picks = fake_costmodel
    settings = ClientSettings(server=("127.0.0.1", 7000), security=auth.Security(None, "client"))
    picks["protocol"] = "fss"
    assert relu_protocol_for(settings, tiny_plan.public_info()) == "fss"
    hinted = ClientSettings(server=("127.0.0.1", 7000), security=auth.Security(None, "client"), link_rtt_s=0.03,
                            link_rate_bps=5e7)
    assert relu_protocol_for(hinted, tiny_plan.public_info()) == "fss"
    assert calls == [("auto", tiny_plan.plan_hash, 0.0, None), ("auto", tiny_plan.plan_hash, 0.03, 5e7)]
    crypten = ClientSettings(server=("127.0.0.1", 7000), security=auth.Security(None, "client"), engine="crypten")
    assert relu_protocol_for(crypten, tiny_plan.public_info()) is None and len(calls) == 2


def test_auto_picks_among_the_protocols_the_server_offers(tiny_plan):
    """The tiny plan's stem and first stage have no ReLU: gmw and fss leave local truncations whose wrap can
    garble an image (bound about 6.5e-6 each), fss-exact's gates leave none. auto takes the faithful one
    where the server offers it, else the fastest of what it offers."""
    import dataclasses
    from secure.core.costmodel import protocol_costs, resolve_relu_protocol, wrap_bound
    public = tiny_plan.public_info()
    assert [wrap_bound(public, p)[1] > 2.0 ** -40 for p in ("gmw", "fss", "fss-exact")] == [True, True, False]
    costs = protocol_costs(public)
    fastest = lambda names, rtt: min(names, key=lambda p: costs[p].online_s(rtt, None))  # noqa: E731
    for rtt in (0.0, 0.05):
        assert resolve_relu_protocol("auto", public, rtt) == "fss-exact"
        assert resolve_relu_protocol("auto", public, rtt, offered=("gmw", "fss-exact")) == "fss-exact"
        assert resolve_relu_protocol("auto", public, rtt, offered=("gmw", "fss")) == fastest(("gmw", "fss"), rtt)
        assert resolve_relu_protocol("auto", public, rtt, offered=("gmw",)) == "gmw"
    assert fastest(("gmw", "fss"), 0.05) == "fss"
    wide = dataclasses.replace(public, spec={**public.spec, "value_range": 500.0})  # beyond the fss window (128)
    assert resolve_relu_protocol("auto", wide, 0.05) == "gmw"
    with pytest.raises(ValueError, match=r"the server runs only fss, fss-exact: the plan's activations reach 500"):
        resolve_relu_protocol("auto", wide, 0.05, offered=("fss", "fss-exact"))


def test_client_checks_its_choice_against_the_offer_before_sending(tiny_plan):
    from client.session import ClientSettings, offered_relu_protocols, relu_protocol_for
    public = tiny_plan.public_info()
    base = dict(server=("127.0.0.1", 7000), security=auth.Security(None, "client"))
    offer = {"relu_protocols": ["fss-exact", "some-future-protocol"]}
    assert offered_relu_protocols(None) == offered_relu_protocols({}) == ("gmw", "fss", "fss-exact")
    assert offered_relu_protocols(offer) == ("fss-exact",)
    with pytest.raises(protocol.ProtocolError, match="no ReLU protocol this client runs"):
        offered_relu_protocols({"relu_protocols": ["some-future-protocol"]})
    assert relu_protocol_for(ClientSettings(**base), public, offer) == "fss-exact"
    with pytest.raises(protocol.ControlError, match=r"runs the ReLU protocols fss-exact \(its --relu-protocols\), not "
                                                    r"gmw: pass --relu-protocol auto or fss-exact"):
        relu_protocol_for(ClientSettings(**base, relu_protocol="gmw"), public, offer)


@pytest.mark.parametrize("value", ["bogus", "gmw,gmw", ",", "gmw,fss-exactly"])
def test_pi_server_checks_its_protocol_list(value):
    line = one_error_line(["-m", "server", "--plan", "/nonexistent.plan", "--dealer", "127.0.0.1:1",
                           "--relu-protocols", value])
    assert "--relu-protocols" in line and "give one or more of gmw, fss, fss-exact" in line


@pytest.mark.parametrize("argv, message", [
    (["-m", "secure.measure", "--plan", "/nonexistent.plan", "--relu-protocol", "bogus"],
     r"--relu-protocol 'bogus': choose one of auto, gmw, fss, fss-exact, both$"),
    (["-m", "secure.measure", "--plan", "/nonexistent.plan", "--engine", "crypten", "--relu-protocol", "both"],
     CRYPTEN_REFUSAL),
    (["-m", "secure.agreement", "--plan", "/nonexistent.plan", "--data", "cifar10:/nonexistent",
      "--relu-protocol", "fs"], r"--relu-protocol 'fs': choose one of auto, gmw, fss, fss-exact, both$"),
    (["-m", "secure.agreement", "--plan", "/nonexistent.plan", "--data", "cifar10:/nonexistent",
      "--engine", "crypten", "--relu-protocol", "gmw"], CRYPTEN_REFUSAL),
    (["-m", "deepreduce", "bench", "--no-progress", "--relu-protocol", "bogus"],
     r"--relu-protocol 'bogus': choose one of auto, gmw, fss, fss-exact, both$"),
    (["-m", "deepreduce", "bench", "--no-progress", "--engine", "crypten", "--relu-protocol", "fss"], CRYPTEN_REFUSAL),
])
def test_tool_relu_flags(argv, message):
    import re
    line = one_error_line(argv)
    assert re.search(message, line), line


def test_tool_defaults_are_auto(monkeypatch):
    from secure.cli import register
    from secure.tools import agreement, bench, measure
    import argparse
    for module in (measure, agreement):
        seen = {}
        monkeypatch.setattr(module, "exit_status", lambda command, args, _seen=seen: _seen.update(args=args) or 0)
        assert module.main(["--plan", "x.plan"] + (["--data", "cifar10:x"] if module is agreement else [])) == 0
        assert seen["args"].relu_protocol == "auto"
    assert bench.BenchSettings().relu_protocol == "auto"
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["bench"]).relu_protocol == "auto"
    assert parser.parse_args(["bench", "--relu-protocol", "both"]).relu_protocol == "both"


# -- the harness and the tools say which protocol ran ------------------------------------------------------------

@pytest.mark.slow
def test_local_run_with_gmw_says_so_everywhere(plan):
    from secure.tools.local import run_local_parties
    x = demo_batch(plan, 2)
    run = run_local_parties(plan, x, timeout_s=120, relu_protocol="gmw")
    assert_logits_match(plan, x, run.client.logits)
    assert run.relu_protocol == "gmw"
    for party in (run.server, run.client):
        assert party.profile.relu_protocol == "gmw" and party.profile.engine == "fast"
        assert json.loads(json.dumps(party.to_dict()))["profile"]["relu_protocol"] == "gmw"
        assert "ReLU protocol gmw" in party.profile.summary()


@pytest.mark.slow
def test_measure_and_agreement_report_the_protocol(tiny_plan, tmp_path, capsys):
    from secure.tools.agreement import measure_agreement
    from secure.tools.measure import main
    tiny_plan.save(str(tmp_path / "tiny.plan"))
    out = tmp_path / "m.json"
    assert main(["--plan", str(tmp_path / "tiny.plan"), "--relu-protocol", "gmw", "--json-out", str(out)]) == 0
    text = capsys.readouterr().out
    header, row = text.splitlines()[1:3]
    assert "ReLU" in header and row.split()[:2] == ["loopback", "gmw"]
    assert json.loads(out.read_text())["relu_protocol"] == "gmw"
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    result = measure_agreement(tiny_plan, images, torch.zeros(2, dtype=torch.long), batch_size=2, progress=False,
                               relu_protocol="gmw")
    assert result["relu_protocol"] == "gmw" and result["max_abs_logit_diff"] <= TOLERANCE


def test_bench_runs_each_protocol_with_both_and_stock_once(monkeypatch, tmp_path, fake_costmodel):
    from secure.tools import bench
    calls = {"stock": 0, "ours": []}

    def figures(online):
        return {"online_s": online, "offline_s": 0.1, "mb": 1.0, "rounds": 10, "relu_share": 0.5, "linear_share": 0.5,
                "mb_sent": 0.5, "mb_received": 0.5, "online_s_runs": [online], "max_abs_error": 0.0}

    def fake_stock(model, batch, repeats, timeout_s, warmup):
        calls["stock"] += 1
        return figures(4.0)

    def fake_ours(model, batch, repeats, timeout_s, engine, warmup, link=None, relu_protocol=None):
        calls["ours"].append(relu_protocol)
        return {**figures(1.0 if relu_protocol == "gmw" else 0.5), "relu_protocol": relu_protocol}

    monkeypatch.setattr(bench, "measure_stock", fake_stock)
    monkeypatch.setattr(bench, "measure_ours", fake_ours)
    model = bench.random_model("tiny", ModelSpec(alpha=0.125, input_size=8))
    logged = []
    doc = bench.run_bench([model], [1, 2], repeats=1, progress=False, log=logged.append, relu_protocol="both")
    assert calls["stock"] == 2 and calls["ours"] == ["gmw", "fss", "gmw", "fss"]
    assert [(e["batch_size"], e["relu_protocol"]) for e in doc["models"]] == [(1, "gmw"), (1, "fss"), (2, "gmw"),
                                                                                (2, "fss")]
    assert [e["speedup"] for e in doc["models"]] == [pytest.approx(4.0), pytest.approx(8.0)] * 2
    assert doc["settings"]["relu_protocol"] == "both"
    table = bench.format_table(doc)
    assert "proto" in table and {"gmw", "fss"} <= {line.split()[3] for line in table.splitlines()[4:]}
    assert "fss" in bench.format_projections(doc)
    bench.plot_bench(doc, str(tmp_path / "p.png"))
    # auto: one pick per model, logged; the entries and the ours runs carry it
    calls["ours"].clear()
    doc = bench.run_bench([model], [1], repeats=1, progress=False, log=logged.append, relu_protocol="auto")
    assert calls["ours"] == ["gmw"] and doc["models"][0]["relu_protocol"] == "gmw"
    assert any("auto picked gmw for tiny" in line for line in logged)
    # the library default (None) leaves the harness's default alone and records what the profiles said
    calls["ours"].clear()
    doc = bench.run_bench([model], [1], repeats=1, progress=False, log=logged.append)
    assert calls["ours"] == [None] and doc["models"][0]["relu_protocol"] is None


# -- the session request through the real roles ----------------------------------------------------------------

@pytest.mark.slow
def test_the_client_choice_travels_in_the_session_request(plan_file, plan):
    dealer, dealer_addr = start_dealer()
    server = None
    try:
        server, address = start_server(plan_file, "--dealer", dealer_addr)
        host, port = protocol.parse_address(address)
        request = {"type": "session", "batch_sizes": [1], "plan_hash": plan.plan_hash, "engine": "fast"}
        for bad in ("bogus", "auto"):  # a client must resolve auto itself
            with pytest.raises(protocol.RemoteError, match=rf"unknown ReLU protocol '{bad}': one of gmw, fss, fss-exact") as info:
                auth.request(host, port, {**request, "relu_protocol": bad}, 10, 10, "server", "session",
                             security=security(), role="client")
            assert "\n" not in str(info.value)
        images = IMAGES[::5][:2]
        done = client("infer", "--server", address, "--relu-protocol", "gmw", "--batch-size", "2", "--json",
                      *CLIENT_FAST, *map(str, images))
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout)
        assert_matches_plaintext(doc["images"], plaintext(plan, images))
        assert doc["relu_protocol"] == "gmw" and doc["relu_protocol_choice"] == "gmw"
        assert [s["relu_protocol"] for s in doc["sessions"]] == ["gmw"]
        server.wait_line(r"session \w+: 2 image\(s\), TLS links, ReLU protocol gmw", 10)
    finally:
        if server is not None:
            assert server.terminate() == 0
        assert dealer.terminate() == 0


@pytest.mark.slow
def test_a_server_that_runs_only_fss_exact_refuses_any_other(plan_file, plan):
    """pi-server --relu-protocols fss-exact: info lists it, auto picks it, an explicit gmw fails at the client
    before any image is read, and a raw request for gmw, or one naming none (gmw by default), is refused by
    the server itself (a client that skips its own check gains nothing)."""
    dealer, dealer_addr = start_dealer()
    server = None
    try:
        server, address = start_server(plan_file, "--dealer", dealer_addr, "--relu-protocols", "fss-exact")
        info = client("info", "--server", address, "--json", *CLIENT_FAST)
        assert info.returncode == 0 and json.loads(info.stdout)["relu_protocols"] == ["fss-exact"], info.stderr
        host, port = protocol.parse_address(address)
        request = {"type": "session", "batch_sizes": [1], "plan_hash": plan.plan_hash, "engine": "fast"}
        for extra, said in (({"relu_protocol": "gmw"}, "not gmw:"), ({}, "not gmw (the default of a client")):
            with pytest.raises(protocol.RemoteError, match="this server runs the ReLU protocols fss-exact") as refused:
                auth.request(host, port, {**request, **extra}, 10, 10, "server", "session", security=security(),
                             role="client")
            assert said in str(refused.value) and "\n" not in str(refused.value)
        images = IMAGES[::5][:2]
        wrong = client("infer", "--server", address, "--relu-protocol", "gmw", *CLIENT_FAST, *map(str, images))
        assert_one_line_error(wrong, r"runs the ReLU protocols fss-exact .*not gmw: pass --relu-protocol auto or fss-exact")
        done = client("infer", "--server", address, "--batch-size", "2", "--json", *CLIENT_FAST, *map(str, images))
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout)
        assert_matches_plaintext(doc["images"], plaintext(plan, images))
        assert doc["relu_protocol"] == "fss-exact" and doc["relu_protocol_choice"] == "auto"
        server.wait_line(r"session \w+: 2 image\(s\), TLS links, ReLU protocol fss-exact", 10)
    finally:
        if server is not None:
            assert server.terminate() == 0
        assert dealer.terminate() == 0


# -- the fss protocol itself --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_fss_session_matches_plaintext(plan):
    # the plumbing end to end with the engine's one-round ReLU: real processes, two queries of one session
    from secure.tools.local import run_local_parties
    x = demo_batch(plan, 3)
    run = run_local_parties(plan, x, timeout_s=180, batch_size=2, relu_protocol="fss")  # two queries, one session
    assert run.relu_protocol == "fss"
    assert run.server.profile.relu_protocol == run.client.profile.relu_protocol == "fss"
    assert_logits_match(plan, x, run.client.logits)
