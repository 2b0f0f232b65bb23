"""WATCHER_VLM_MANAGED and WATCHER_VLM_UNREACHABLE_LIMIT: read from the environment as
start.sh exports them, validated with one line per bad value, and a default limit that
leaves start.sh time to bring a dead VLM server back."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from watcher.core.settings import Settings, SettingsError, load_settings

START_SH = Path(__file__).resolve().parents[1] / "start.sh"
S3 = {"s3_endpoint": "http://127.0.0.1:9", "s3_bucket": "bucket", "s3_access_key": "t:k",
      "s3_secret_key": "secret"}


def test_defaults_and_what_start_sh_exports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHER_VLM_MANAGED", raising=False)
    monkeypatch.delenv("WATCHER_VLM_UNREACHABLE_LIMIT", raising=False)
    settings = load_settings(**S3)
    assert settings.vlm_managed is False and settings.vlm_unreachable_limit == 1200
    monkeypatch.setenv("WATCHER_VLM_MANAGED", "1")  # start.sh exports 1 or 0
    monkeypatch.setenv("WATCHER_VLM_UNREACHABLE_LIMIT", "2.5")
    settings = load_settings(**S3)
    assert settings.vlm_managed is True and settings.vlm_unreachable_limit == 2.5
    monkeypatch.setenv("WATCHER_VLM_MANAGED", "0")
    assert load_settings(**S3).vlm_managed is False


@pytest.mark.parametrize(("name", "value"), [
    ("WATCHER_VLM_UNREACHABLE_LIMIT", "0"),
    ("WATCHER_VLM_UNREACHABLE_LIMIT", "-5"),
    ("WATCHER_VLM_UNREACHABLE_LIMIT", "twenty minutes"),
    ("WATCHER_VLM_MANAGED", "maybe"),
])
def test_a_bad_value_is_named(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as raised:
        load_settings(**S3)
    assert len(raised.value.lines) == 1 and raised.value.lines[0].startswith(f"invalid setting {name}: ")
    if value.isalpha() or " " in value:  # (digits may be in the rule itself: "greater than 0")
        assert value not in raised.value.lines[0]  # values are never echoed


def _start_sh_default(name: str) -> float:
    match = re.search(rf'^{name}="\$\{{{name}:-([0-9.]+)\}}"$', START_SH.read_text(), re.M)
    assert match, f"{name} has no default in start.sh"
    return float(match.group(1))


def test_the_default_limit_covers_a_restart_after_the_longest_backoff() -> None:
    fields = Settings.model_fields
    limit = fields["vlm_unreachable_limit"].default
    longest_backoff = _start_sh_default("WATCHER_VLM_RESTART_MAX_DELAY")
    # start.sh's and the daemon's WATCHER_VLM_STARTUP_TIMEOUT: how long a start may take.
    assert _start_sh_default("WATCHER_VLM_STARTUP_TIMEOUT") == fields["vlm_startup_timeout"].default
    assert limit >= longest_backoff + fields["vlm_startup_timeout"].default
