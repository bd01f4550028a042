"""WorkerConfig: each engine and service setting is a flag, the workers' argv round-trips, bad values name a flag."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import typing

import pytest

from ringlm import cli
from ringlm.server import worker
from ringlm.server.config import (ServiceLimits, WorkerConfig, add_arguments, config_from_args, config_to_argv,
                                  flag_type)
from ringlm.server.engine.config import EngineConfig

ENGINE_SETTINGS = list(dataclasses.fields(EngineConfig))
SERVICE_SETTINGS = list(dataclasses.fields(ServiceLimits))


def worker_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def serve(*flags: str) -> WorkerConfig:
    """The WorkerConfig that `ringlm serve FLAGS` runs with."""
    return config_from_args(cli.build_parser().parse_args(["serve", *flags]))


def non_default(item: dataclasses.Field) -> tuple[list[str], object]:
    """Flags that set `item` to a value other than its default, and that value."""
    flag = "--" + item.name.replace("_", "-")
    if isinstance(item.default, bool):
        return [flag if not item.default else "--no-" + flag[2:]], not item.default
    return [flag, str(item.default + 1)], item.default + 1


@pytest.mark.parametrize("item", ENGINE_SETTINGS, ids=lambda item: item.name)
def test_each_engine_setting_is_a_flag_that_reaches_the_engine_config(item):
    flags, value = non_default(item)
    assert serve(*flags).engine_config() == dataclasses.replace(EngineConfig(), **{item.name: value})


@pytest.mark.parametrize("item", SERVICE_SETTINGS, ids=lambda item: item.name)
def test_each_service_limit_is_a_flag_that_reaches_the_service_limits(item):
    flags, value = non_default(item)
    assert serve(*flags).service_limits() == dataclasses.replace(ServiceLimits(), **{item.name: value})


def test_without_flags_the_built_configs_are_the_engine_and_service_defaults():
    config = serve()
    assert config == WorkerConfig()
    assert config.engine_config() == EngineConfig()
    assert config.service_limits() == ServiceLimits()


EVERY_FIELD_SET = WorkerConfig(
    model="/models/tiny.gguf", host="0.0.0.0", port=9100, device="cuda:1", dtype="bfloat16", worker_index=3,
    torch_threads=2, num_slots=4, max_seq_len=512, max_batch_tokens=64, max_tokens_limit=100, max_waiting=7,
    max_top_logprobs=3, priority_aging_s=2.0, prefix_cache=False, max_open_streams=5, stream_idle_timeout_s=2.5,
    max_wait_ms=1500, max_stop_strings=0, max_stop_length=9, max_logit_bias=0, max_messages=3, max_deadline_ms=60_000,
    max_request_id_length=16, auth_timeout_s=3.5, max_stop_token_ids=2, max_session_length=20, step_timeout_s=5.5, max_connections=9, max_frame_bytes=4096, idle_timeout_s=0.1, frame_timeout_s=1e-3,
    drain_grace_s=0.0, metrics_port=9200, tls_cert="/tls/server.pem", tls_key="/tls/server.key",
    tls_ca="/tls/ca.pem", auth_token_file="-token file", debug_blocking_ms=12.5,
    zookeeper="zk1:2181,zk2:2181/ringlm", weight=0.3, zookeeper_auth_file="/zk/credentials")


def test_the_round_trip_config_sets_every_field_to_a_value_other_than_its_default():
    assert [item.name for item in dataclasses.fields(WorkerConfig)
            if getattr(EVERY_FIELD_SET, item.name) == item.default] == []


@pytest.mark.parametrize("config", [WorkerConfig(), EVERY_FIELD_SET], ids=["defaults", "every-field-set"])
def test_config_to_argv_round_trips_through_the_workers_flags(config):
    assert config_from_args(worker_parser().parse_args(config_to_argv(config))) == config


def test_a_boolean_round_trips_both_ways():
    for prefix_cache in (True, False):
        config = WorkerConfig(prefix_cache=prefix_cache)
        assert config_from_args(worker_parser().parse_args(config_to_argv(config))).prefix_cache is prefix_cache


def test_flag_types_come_from_the_type_hints():
    parser = worker_parser()
    hints = typing.get_type_hints(WorkerConfig)
    assert flag_type(hints["num_slots"]) is int and flag_type(hints["torch_threads"]) is int
    assert flag_type(hints["debug_blocking_ms"]) is float and flag_type(hints["tls_cert"]) is str
    config = config_from_args(parser.parse_args(["--torch-threads", "3", "--weight", "2", "--no-prefix-cache"]))
    assert (config.torch_threads, config.weight, config.prefix_cache) == (3, 2.0, False)
    assert type(config.weight) is float
    with pytest.raises(SystemExit):
        parser.parse_args(["--num-slots", "1.5"])


def test_every_numeric_field_has_a_range():
    hints = typing.get_type_hints(WorkerConfig)
    unbounded = [item.name for item in dataclasses.fields(WorkerConfig)
                 if flag_type(hints[item.name]) in (int, float)
                 and item.metadata["at_least"] is None and item.metadata["above"] is None]
    assert unbounded == []


@pytest.mark.parametrize("values, flag", [
    ({"num_slots": 0}, "--num-slots"), ({"max_seq_len": 0}, "--max-seq-len"),
    ({"max_batch_tokens": 0}, "--max-batch-tokens"), ({"max_tokens_limit": 0}, "--max-tokens-limit"),
    ({"max_waiting": 0}, "--max-waiting"), ({"max_top_logprobs": -1}, "--max-top-logprobs"),
    ({"priority_aging_s": -1.0}, "--priority-aging-s"),
    ({"max_open_streams": 0}, "--max-open-streams"), ({"stream_idle_timeout_s": 0.0}, "--stream-idle-timeout-s"),
    ({"stream_idle_timeout_s": math.nan}, "--stream-idle-timeout-s"), ({"max_wait_ms": 0}, "--max-wait-ms"),
    ({"max_stop_strings": -1}, "--max-stop-strings"), ({"max_stop_length": 0}, "--max-stop-length"),
    ({"max_logit_bias": -1}, "--max-logit-bias"), ({"max_messages": 0}, "--max-messages"),
    ({"max_deadline_ms": 0}, "--max-deadline-ms"), ({"max_request_id_length": 0}, "--max-request-id-length"),
    ({"max_connections": 0}, "--max-connections"), ({"max_frame_bytes": 0}, "--max-frame-bytes"),
    ({"idle_timeout_s": -1.0}, "--idle-timeout-s"), ({"idle_timeout_s": math.inf}, "--idle-timeout-s"),
    ({"frame_timeout_s": 0.0}, "--frame-timeout-s"), ({"drain_grace_s": -0.5}, "--drain-grace-s"),
    ({"port": 0}, "--port"), ({"port": 65536}, "--port"), ({"metrics_port": 70000}, "--metrics-port"),
    ({"worker_index": -1}, "--worker-index"), ({"torch_threads": 0}, "--torch-threads"),
    ({"debug_blocking_ms": 0.0}, "--debug-blocking-ms"), ({"weight": 0.0}, "--weight"),
    ({"tls_cert": "server.pem"}, "--tls-cert and --tls-key"), ({"tls_key": "server.key"}, "--tls-cert and --tls-key"),
    ({"tls_ca": "ca.pem"}, "--tls-ca"),
], ids=lambda value: str(value) if isinstance(value, dict) else None)
def test_a_bad_value_is_refused_naming_its_flag(values, flag):
    with pytest.raises(ValueError, match=flag):
        WorkerConfig(**values)


def test_a_bad_value_on_the_command_line_exits_2_naming_the_flag(capsys):
    assert cli.main(["serve", "--max-wait-ms", "0"]) == 2
    assert "ringlm serve: error: --max-wait-ms must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        worker.main(["--num-slots", "0"])
    assert exit_.value.code == 2
    assert "--num-slots must be at least 1, got 0" in capsys.readouterr().err


def test_cluster_takes_a_count_and_a_base_port():
    args = cli.build_parser().parse_args(["cluster", "--count", "3", "--base-port", "9200", "--num-slots", "4"])
    assert args.count == 3
    assert config_from_args(args) == WorkerConfig(port=9200, num_slots=4)
    assert config_from_args(cli.build_parser().parse_args(["cluster"])).port == WorkerConfig().port
    for command in (["cluster", "--count", "0"], ["serve", "--workers", "0"], ["cluster", "--servers", "2"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(command)


def test_the_command_line_reads_the_flags_without_loading_the_model_side():
    """Every `ringlm` command builds the serve and cluster parsers: that must not cost torch or the tokenizer."""
    probe = ("import json, sys, ringlm.cli; ringlm.cli.build_parser(); print(json.dumps(sorted(m for m in sys.modules "
             "if m.split('.')[0] in ('torch', 'numpy', 'gevent', 'regex') or m.startswith('ringlm.ext'))))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout) == []
