"""What a run prints: the flags that differ from the defaults, a warm-up that outlasts the run, the final table."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import SimpleNamespace

from phi3v.train.arguments import BaseDataArguments
from phi3v.train.parsing import parse_args
from phi3v.train.reporting import end_summary, log_config
from phi3v.train.trainer import warn_if_warmup_outlasts_the_run


@dataclass
class Data(BaseDataArguments):
    pass


def test_the_config_line_lists_only_what_the_flags_changed(caplog):
    groups = parse_args(Data, ["--learning_rate", "1e-4", "--use_lora", "--eval_samples", "5"])
    with caplog.at_level(logging.INFO, logger="phi3v"):
        log_config(*groups)
    lines = {r.getMessage().split(":")[0]: r.getMessage() for r in caplog.records}
    assert lines["ModelArguments"] == "ModelArguments: {'use_lora': True, 'tuning_mode': 'lora'}"
    assert lines["Data"] == "Data: {'eval_samples': 5}"
    assert lines["RecipeTrainingArguments"] == "RecipeTrainingArguments: {'learning_rate': 0.0001}"


def test_warmup_longer_than_the_run_is_said(caplog):
    args = SimpleNamespace(learning_rate=4e-5, get_warmup_steps=lambda n: 50)
    with caplog.at_level(logging.WARNING):
        warn_if_warmup_outlasts_the_run(args, 12)
    assert "warm-up lasts 50 steps and the run 12: the learning rate never reaches --learning_rate 4e-05 (it ends " \
           "at 9.6e-06)" in caplog.text
    caplog.clear()
    warn_if_warmup_outlasts_the_run(SimpleNamespace(learning_rate=4e-5, get_warmup_steps=lambda n: 50), 51)
    assert not caplog.text


def summary(metrics: dict, caplog) -> list[str]:
    with caplog.at_level(logging.INFO, logger="phi3v"):
        end_summary(metrics, SimpleNamespace(output_dir="out"), 0.0)
    return caplog.records[-1].getMessage().splitlines()[1:]


def test_the_final_table_is_aligned_and_says_what_did_not_run(caplog):
    lines = summary({"eval_before_anls": 0.5, "eval_before_anls_case_sensitive": 0.25, "eval_after_anls": 0.75,
                     "eval_after_anls_case_sensitive": 0.625, "eval_after_runtime": 3.0}, caplog)
    assert lines[:2] == ["  anls                 before  0.5000  after  0.7500",
                         "  anls_case_sensitive  before  0.2500  after  0.6250"]
    resumed = summary({"eval_after_accuracy": 0.5}, caplog)  # after a resume: no evaluation before
    assert resumed[0] == "  accuracy     before       -  after  0.5000"
    no_after = summary({"eval_before_accuracy": 0.25}, caplog)
    assert no_after[:2] == ["  accuracy     before  0.2500  after       -",
                            "  (no evaluation after training: --no_eval_after_training)"]


def test_the_dataloader_workers_warning_comes_from_the_first_process_only(capsys):
    import warnings

    from phi3v.train.reporting import setup_logging

    message = "This DataLoader will create 4 worker processes in total. Our suggested max number of worker is 2"
    shown = {}
    for should_log in (True, False):
        with warnings.catch_warnings():  # each pass starts from the default filters and stderr writer
            setup_logging(SimpleNamespace(should_log=should_log, disable_tqdm=True))
            warnings.warn(message, UserWarning, stacklevel=1)
            warnings.warn(message, UserWarning, stacklevel=1)  # a second DataLoader (evaluation)
        shown[should_log] = capsys.readouterr().err.count("This DataLoader will create")
    assert shown == {True: 1, False: 0}
