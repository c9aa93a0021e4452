"""The API reports its steps through `logging` (logger "netmend"); the terminal line stays off when not a TTY."""
from __future__ import annotations

import logging

import netmend
from netmend.progress import quiet, stage


def test_repair_logs_each_step(backdoored, defect, caplog):
    model, _ = backdoored
    with caplog.at_level(logging.INFO, logger="netmend"):
        netmend.repair(model, defect, method="fine-pruning")
    text = caplog.text
    for step in ("measuring the backdoor before the repair", "locating: dormant", "repairing: prune", "acceptance gate",
                 "measuring after the repair"):
        assert step in text, text
    assert "done (" in text


def test_stage_is_quiet_without_a_terminal(capsys):
    assert quiet()                       # pytest captures stderr: not a TTY
    with stage("a step", delay=0.0):
        pass
    assert capsys.readouterr().err == ""
