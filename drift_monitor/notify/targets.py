"""Webhook targets (``outputs.notify``): what a target is, and the checks that run at start-up.

Why checked this hard before the run: a notification target that is wrong (a typo in the URL,
a severity that does not exist, a token variable not exported in the job's environment) would
only show at the first alert, hours in, when nobody is told. So each of those is a
:class:`NotifyError` at construction, one line naming the fix. An *unreachable* receiver is not
an error: it may come up later (the delivery thread warns once, :mod:`.delivery`).

Why secrets are templates: a header value (or the URL: a Slack webhook's path is its secret) may
name environment variables as ``${VAR}``. The target keeps the template and expands it only when
it sends; the run's stored configuration (``to_dict``) shows the template, and a header value
with no ``${VAR}`` in it is shown as ``<redacted>``. So no token reaches the store or a config
dump. A variable named but not set is an error at construction.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from drift_monitor.alerts.rules import SEVERITIES
from drift_monitor.errors import ConfigError

#: ``${NAME}`` in a URL or a header value: the environment variable NAME.
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: The body formats: ``json`` (every field of the event plus a Slack-compatible ``text``) and
#: ``slack`` (``{"text": ...}`` only, for receivers that refuse unknown fields).
FORMATS = ("json", "slack")
_FIELDS = ("url", "min_severity", "format", "headers", "name", "timeout_s", "retries")


class NotifyError(ConfigError):
    """A bad notification target, with a message that names the fix."""


def expand(template: str, where: str) -> str:
    """``template`` with every ``${VAR}`` replaced by the environment's value; an unset variable
    raises :class:`NotifyError` naming it."""
    def one(m: re.Match[str]) -> str:
        value = os.environ.get(m.group(1))
        if value is None:
            raise NotifyError(f"{where} reads the environment variable {m.group(1)}, which is not set: export it "
                              f"in the job's environment (or remove ${{{m.group(1)}}})")
        return value
    return _VAR.sub(one, template)


def severity_rank(severity: str) -> int:
    """Order of severities (info < warning < critical); an unknown one ranks above all."""
    return SEVERITIES.index(severity) if severity in SEVERITIES else len(SEVERITIES)


@dataclass
class WebhookTarget:
    """One webhook receiver of alert notifications.

    ``url``: http(s) URL (may hold ``${VAR}``). ``min_severity``: the least severe alert sent
    (``info`` < ``warning`` < ``critical``). ``format``: ``json`` or ``slack`` (:data:`FORMATS`).
    ``headers``: {name: value}, values usually ``"Bearer ${TOKEN_VAR}"``. ``name``: the label the
    store and the dashboard show (default ``host:port`` of the URL: never its path or query,
    which may be a secret). ``timeout_s``: per request. ``retries``: more attempts after a
    failed one (with backoff) before the notification waits for the next snapshot.
    """

    url: str
    min_severity: str = "warning"
    format: str = "json"
    headers: dict[str, str] = field(default_factory=dict)
    name: str | None = None
    timeout_s: float = 5.0
    retries: int = 3

    def __post_init__(self) -> None:
        where = "outputs.notify"
        if not isinstance(self.url, str) or not self.url.strip():
            raise NotifyError(f"{where}: url must be an http(s) URL, e.g. http://alerts.example:8080/hook, "
                              f"got {self.url!r}")
        where = f"outputs.notify target {self.url!r}"
        if self.min_severity not in SEVERITIES:
            raise NotifyError(f"{where}: unknown min_severity {self.min_severity!r}; use one of "
                              f"{', '.join(SEVERITIES)}")
        if self.format not in FORMATS:
            raise NotifyError(f"{where}: unknown format {self.format!r}; use one of {', '.join(FORMATS)}")
        if not isinstance(self.headers, Mapping) or not all(
                isinstance(k, str) and k and isinstance(v, str) for k, v in self.headers.items()):
            raise NotifyError(f"{where}: headers must map header names to strings, e.g. "
                              "{Authorization: 'Bearer ${DRIFT_TOKEN}'}")
        self.headers = dict(self.headers)
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) \
                or not 0 < self.timeout_s <= 300:
            raise NotifyError(f"{where}: timeout_s must be a number of seconds in (0, 300], got {self.timeout_s!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or not 0 <= self.retries <= 20:
            raise NotifyError(f"{where}: retries must be an integer from 0 to 20, got {self.retries!r}")
        url = self.resolved_url()  # also checks that its variables are set
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise NotifyError(f"{where}: malformed URL (it needs http:// or https:// and a host, e.g. "
                              "http://alerts.example:8080/hook)")
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise NotifyError(f"{where}: malformed URL (its port is not a number from 0 to 65535)") from None
        self.resolved_headers()  # their variables must be set now, not at the first alert
        if self.name is None:
            self.name = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        elif not isinstance(self.name, str) or not self.name.strip():
            raise NotifyError(f"{where}: name must be a non-empty string, got {self.name!r}")

    @classmethod
    def coerce(cls, value: Any) -> WebhookTarget:
        """A target from itself, a mapping of its fields or a bare URL string."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(url=value)
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(_FIELDS))
            if unknown:
                import difflib

                hint = difflib.get_close_matches(str(unknown[0]), _FIELDS, 1)
                raise NotifyError(f"outputs.notify: unknown key {unknown[0]!r}"
                                  f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; allowed: {', '.join(_FIELDS)}")
            if "url" not in value:
                raise NotifyError("outputs.notify: a target needs a url, e.g. {url: http://alerts.example:8080/hook}")
            return cls(**dict(value))
        raise NotifyError(f"outputs.notify: a target is a URL or a mapping (url, min_severity, ...), "
                          f"got {type(value).__name__}")

    def wants(self, severity: str) -> bool:
        """Whether an alert of ``severity`` is sent to this target."""
        return severity_rank(severity) >= severity_rank(self.min_severity)

    def resolved_url(self) -> str:
        return expand(self.url, f"outputs.notify target {self.url!r}: url")

    def resolved_headers(self) -> dict[str, str]:
        return {k: expand(v, f"outputs.notify target {self.url!r}: header {k}") for k, v in self.headers.items()}

    def to_dict(self) -> dict[str, Any]:
        """The target as stored with the run's configuration: templates, never a secret."""
        return {"url": self.url, "min_severity": self.min_severity, "format": self.format, "name": self.name,
                "headers": {k: v if _VAR.search(v) else "<redacted>" for k, v in self.headers.items()},
                "timeout_s": self.timeout_s, "retries": self.retries}

    def __repr__(self) -> str:
        return f"WebhookTarget({self.to_dict()!r})"


def parse_targets(value: Any) -> list[WebhookTarget]:
    """``outputs.notify`` as a list of targets: None, one target, or a list of them."""
    if value is None:
        return []
    if isinstance(value, (str, Mapping, WebhookTarget)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise NotifyError(f"outputs.notify must be a list of webhook targets, got {type(value).__name__}")
    targets = [WebhookTarget.coerce(v) for v in value]
    names = [t.name for t in targets]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise NotifyError(f"outputs.notify: two targets are named {dup!r}; give each a distinct name")
    return targets
