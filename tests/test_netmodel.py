"""secure.tools.netmodel: the latency projection from a loopback profile (no processes, no network)."""

import json

import pytest

from secure.tools import netmodel
from secure.tools.netmodel import OVERLAP_SHARE, PROJECTIONS, Cost, WIRE_OVERHEAD, cost_of, format_projections, predict_latency, project
from secure.core.profiling import LayerProfile, Profile

PROFILE = {"online_s": 2.0, "bytes_sent": 30e6, "bytes_received": 50e6, "rounds": 200, "batch_size": 1,
           "setup_s": 0.1}


def test_formula_terms():
    wire = (50e6 + OVERLAP_SHARE * 30e6) * WIRE_OVERHEAD * 8
    assert predict_latency(PROFILE, 1e9, 0.0) == pytest.approx(2.0 + wire / 1e9)
    assert predict_latency(PROFILE, 100e6, 0.02) == pytest.approx(2.0 + 200 * 0.02 / 2 + wire / 100e6)  # a flight: rtt / 2
    # more bandwidth never hurts, more latency always does
    assert predict_latency(PROFILE, 1e9, 0.001) < predict_latency(PROFILE, 1e8, 0.001)
    assert predict_latency(PROFILE, 1e9, 0.001) < predict_latency(PROFILE, 1e9, 0.002)
    # the direction that carries more counts in full, whichever it is
    swapped = {**PROFILE, "bytes_sent": 50e6, "bytes_received": 30e6}
    assert predict_latency(swapped, 1e8, 0.0) == pytest.approx(predict_latency(PROFILE, 1e8, 0.0))


def test_accepts_profile_objects_and_measure_dicts():
    layer = LayerProfile("conv", "conv", 2.0, 30_000_000, 50_000_000, 200, 0)
    profile = Profile.from_layers([layer], setup_s=0.1, batch_size=1, insecure_tfp=False, engine="fast")
    assert predict_latency(profile, 1e9, 2e-4) == pytest.approx(predict_latency(PROFILE, 1e9, 2e-4))
    assert predict_latency(profile.to_dict(), 1e9, 2e-4) == pytest.approx(predict_latency(PROFILE, 1e9, 2e-4))
    measured = {"online_s_per_image": 1.0, "mb_sent_per_image": 15.0, "mb_received_per_image": 25.0,
                "rounds": 200, "batch_size": 2}  # secure.tools.measure.measure_cost of a batch of 2
    assert cost_of(measured) == Cost(2.0, 30e6, 50e6, 200, 2)
    assert predict_latency(measured, 1e9, 2e-4) == pytest.approx(predict_latency(PROFILE, 1e9, 2e-4))


def test_projections_lan_and_wan():
    assert set(PROJECTIONS) >= {"LAN", "WAN"}
    assert PROJECTIONS["LAN"].bandwidth_bps == 1e9 and PROJECTIONS["LAN"].rtt_s == pytest.approx(2e-4)
    times = project(PROFILE)
    assert times["WAN"] > times["LAN"] > PROFILE["online_s"]
    table = format_projections(PROFILE)
    assert "LAN" in table and "WAN" in table and "200 rounds" in table


@pytest.mark.parametrize("bad", [{}, {"online_s": 1.0}, {"online_s": "x", "bytes_sent": 1, "bytes_received": 1,
                                                         "rounds": 1}, [1, 2], None])
def test_bad_profiles_are_one_clear_error(bad):
    with pytest.raises(ValueError):
        predict_latency(bad, 1e9, 0.0)


def test_bad_links():
    with pytest.raises(ValueError):
        predict_latency(PROFILE, 0, 0.0)
    with pytest.raises(ValueError):
        predict_latency(PROFILE, 1e9, -1.0)


def test_cli(tmp_path, capsys):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"role": "server", "profile": PROFILE}))
    assert netmodel.main([str(path)]) == 0
    assert "WAN" in capsys.readouterr().out
    path.write_text("{}")
    assert netmodel.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
