"""The researcher's side: submit, watch and read sweeps from Python, over the
coordinator's HTTP API (``/api/v1``), on the standard library alone; pandas,
when installed, gives DataFrames.

    import ablate
    client = ablate.Client()                 # the address and token the CLI uses
    exp = client.submit("experiments/specs/quickstart.toml")
    exp.wait()
    trials = exp.trials(frame=True)          # a DataFrame: params and metrics as columns
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

__all__ = ["AblateError", "Client", "Experiment", "SpecError"]

_DEFAULT_COORDINATOR = "http://127.0.0.1:7077"


class AblateError(Exception):
    """A call the coordinator refused or could not serve: its message says what to do."""

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.status = status


class SpecError(AblateError):
    """A spec the coordinator refused; ``path`` names the field to fix (``sweep.params.lr``)."""

    def __init__(self, message: str, path: str, detail: str) -> None:
        super().__init__(message, 400)
        self.path = path
        self.detail = detail


def _credentials() -> Dict[str, Dict[str, str]]:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    path = Path(base) / "ablate" / "credentials.toml"
    if not path.exists():
        return {}
    import tomllib

    return tomllib.loads(path.read_text()).get("coordinators", {})


class Client:
    """A coordinator's HTTP API.

    ``url`` is the API's address (the coordinator's ``--http-listen``); by default
    ``ABLATE_API``, else the one ``ablate up`` kept in the credentials file for the
    coordinator the CLI uses (``ABLATE_COORDINATOR``, default ``http://127.0.0.1:7077``).
    ``token`` is ``ABLATE_TOKEN``, else that coordinator's in the credentials file;
    it goes in the ``Authorization`` header of every call. ``ca`` (``ABLATE_CA``)
    checks an ``https://`` address, as the CLI does; else the system's roots.
    """

    def __init__(self, url: Optional[str] = None, token: Optional[str] = None, ca: Optional[str] = None) -> None:
        coordinator = os.environ.get("ABLATE_COORDINATOR", _DEFAULT_COORDINATOR).rstrip("/")
        kept = _credentials().get(coordinator, {})
        self.url = (url or os.environ.get("ABLATE_API") or kept.get("api") or "").rstrip("/")
        if not self.url:
            raise AblateError(
                f"no API address for {coordinator}: give Client(url='http://host:port'), the "
                "coordinator's --http-listen address, or set ABLATE_API"
            )
        self.token = token or os.environ.get("ABLATE_TOKEN") or kept.get("token")
        ca = ca or os.environ.get("ABLATE_CA")
        self._context = ssl.create_default_context(cafile=ca) if self.url.startswith("https://") else None

    # -- transport

    def _call(self, method: str, path: str, body: Any = None, query: Optional[Dict[str, Any]] = None) -> Any:
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, context=self._context, timeout=120) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            try:
                answer = json.loads(error.read() or b"{}")
            except ValueError:
                answer = {}
            message = answer.get("error") or f"{error.code} {error.reason}"
            if "path" in answer:
                raise SpecError(message, answer["path"], answer.get("message", "")) from None
            raise AblateError(message, error.code) from None

    # -- writes

    def submit(
        self,
        spec: Union[str, Path, Dict[str, Any]],
        format: Optional[str] = None,
        into: Optional[str] = None,
    ) -> "Experiment":
        """Submits a spec: a file's path, its TOML or YAML text, or the spec as a dict.
        With ``into``, the spec's points that the finished experiment ``into`` does not
        hold yet are added to it (its base must agree). A spec the coordinator refuses
        raises :class:`SpecError` naming the field."""
        if isinstance(spec, dict):
            body: Dict[str, Any] = {"spec": spec}
        else:
            text = str(spec)
            is_file = isinstance(spec, Path) or ("\n" not in text and len(text) < 4096 and os.path.isfile(text))
            if is_file:
                path = Path(text)
                text = path.read_text()
                format = format or ("yaml" if path.suffix in (".yaml", ".yml") else "toml")
            body = {"spec": text, "format": format or "toml"}
        if into is not None:
            body["into"] = into
        answer = self._call("POST", "/api/v1/experiments", body)
        experiment = Experiment(self, answer["experiment_id"], answer["trial_count"])
        experiment.reused = answer.get("reused", 0)
        experiment.already_held = answer.get("already_held", 0)
        return experiment

    def extend(self, experiment: str, spec: Union[str, Path, Dict[str, Any]], format: Optional[str] = None) -> "Experiment":
        """Adds the spec's new points to a finished experiment (``submit(spec, into=...)``)."""
        return self.submit(spec, format=format, into=experiment)

    def cancel(self, experiment: str) -> int:
        """Cancels an experiment's pending and running trials; returns how many."""
        return self._call("POST", f"/api/v1/experiments/{experiment}/cancel", {})["cancelled"]

    def retry(self, experiment: str, outcomes: Optional[List[str]] = None) -> int:
        """Puts a finished experiment's failed, crashed or cancelled trials (or those of
        ``outcomes``) back to pending, their attempts kept; returns how many."""
        body = {"outcomes": list(outcomes or [])}
        return self._call("POST", f"/api/v1/experiments/{experiment}/retry", body)["retried"]

    def tag(self, experiment: str, *tags: str, remove: bool = False) -> List[str]:
        """Adds (or with ``remove``, removes) tags; returns the experiment's tags now."""
        body = {"remove": list(tags)} if remove else {"add": list(tags)}
        return self._call("POST", f"/api/v1/experiments/{experiment}/tags", body)["tags"]

    def note(self, experiment: str, text: str) -> None:
        """Sets the experiment's note; an empty text clears it."""
        self._call("POST", f"/api/v1/experiments/{experiment}/note", {"note": text})

    def delete(self, experiment: str) -> Dict[str, int]:
        """Deletes a finished experiment's rows and objects (its submitter or an admin);
        what other experiments reused of it stays theirs. Returns what went: trials,
        objects, bytes, handed_over."""
        return self._call("DELETE", f"/api/v1/experiments/{experiment}")

    # -- reads

    def experiment(self, experiment: str) -> "Experiment":
        """An experiment by id."""
        return Experiment(self, experiment)

    def experiments(
        self,
        state: Optional[str] = None,
        family: Optional[str] = None,
        name: Optional[str] = None,
        tag: Optional[str] = None,
        limit: int = 200,
        frame: bool = False,
    ) -> Any:
        """Experiments, newest first, with their counts, tags and note; filtered as the
        dashboard's list is (``state``, ``family``, a ``name`` substring, a ``tag``; at
        most ``limit``, up to 1,000)."""
        query = {"state": state, "family": family, "name": name, "tag": tag, "limit": limit}
        rows = self._call("GET", "/api/v1/experiments", query=query)["experiments"]
        return _frame(rows) if frame else rows

    def status(self, experiment: str) -> Dict[str, Any]:
        """One experiment: its state, counts, spec, metrics and recent failures."""
        return self._call("GET", f"/api/v1/experiments/{experiment}")["experiment"]

    def trials(self, experiment: str, frame: bool = False) -> Any:
        """Its trials in order: id, ordinal, state, params, metrics (final), objective, attempts.
        With ``frame``: a DataFrame with a column per parameter and per metric."""
        rows = self._call("GET", f"/api/v1/experiments/{experiment}/trials")["trials"]
        if not frame:
            return rows
        flat = []
        for row in rows:
            out = {k: v for k, v in row.items() if k not in ("params", "metrics")}
            out.update({f"params.{k}": v for k, v in (row.get("params") or {}).items()})
            out.update({f"metrics.{k}": v for k, v in (row.get("metrics") or {}).items()})
            flat.append(out)
        return _frame(flat)

    def curves(
        self,
        experiment: str,
        metrics: Union[str, Iterable[str], None] = None,
        trials: Optional[Iterable[str]] = None,
        points: Optional[int] = 500,
        frame: bool = False,
        wide: bool = False,
    ) -> Any:
        """Curves of one or several metrics (the objective's when none is named), of
        ``trials`` (the best when none are named), each reduced by the coordinator
        to at most ``points`` points (at most 2,000), or every point with
        ``points=None`` (read from ``ablate.metric_series``). A list of ``{trial_id,
        ordinal, metric, steps, values, total_points}``; with ``frame``, a long
        DataFrame (trial_id, ordinal, metric, step, value), or with ``wide`` too a
        column per metric."""
        names = [metrics] if isinstance(metrics, str) else list(metrics or [None])
        trials = list(trials) if trials else None
        series: List[Dict[str, Any]] = []
        for name in names:
            if points is None:
                series += self._every_point(experiment, name, trials)
                continue
            query = {"metric": name, "points": points, "trials": ",".join(trials) if trials else None}
            series += self._call("GET", f"/api/v1/experiments/{experiment}/curves", query=query)["series"]
        if not frame:
            return series
        long = [
            {"trial_id": s["trial_id"], "ordinal": s["ordinal"], "metric": s["metric"], "step": step, "value": value}
            for s in series
            for step, value in zip(s["steps"], s["values"])
        ]
        table = _frame(long)
        if wide:
            return table.pivot_table(index=["trial_id", "ordinal", "step"], columns="metric", values="value").reset_index()
        return table

    def _every_point(self, experiment: str, metric: Optional[str], trials: Optional[List[str]]) -> List[Dict[str, Any]]:
        """Every point of one metric's curves, as the coordinator's series are shaped."""
        if metric is None:
            metric = self.status(experiment).get("objective_metric") or "train_loss"
        if trials is None:
            best = self._call("GET", f"/api/v1/experiments/{experiment}/curves", query={"metric": metric, "points": 3})
            trials = [s["trial_id"] for s in best["series"]]
        if not trials:
            return []
        ids = ",".join("'" + _uuid(t) + "'" for t in trials)
        rows = self.sql(
            f"select m.trial_id::text as trial_id, t.ordinal, m.step, m.value from ablate.metric_series m "
            f"join ablate.trial_results t on t.trial_id = m.trial_id "
            f"where m.experiment_id = '{_uuid(experiment)}' and m.name = {_quote(metric)} "
            f"and m.trial_id in ({ids}) order by t.ordinal, m.step",
            frame=False,
        )
        series: Dict[str, Dict[str, Any]] = {}
        for row in rows:
            s = series.setdefault(row["trial_id"], {"trial_id": row["trial_id"], "ordinal": row["ordinal"],
                                                    "metric": metric, "steps": [], "values": []})
            s["steps"].append(row["step"])
            s["values"].append(row["value"])
        for s in series.values():
            s["total_points"] = len(s["steps"])
        return list(series.values())

    def attempts(self, experiment: str, frame: bool = False) -> Any:
        """Every attempt of its trials: outcome, error, stderr tail, worker, and what it ran
        on and with (``ablate.trial_attempts``: versions, commit, device, host, code)."""
        return self.sql(
            f"select * from ablate.trial_attempts where experiment_id = '{_uuid(experiment)}' "
            f"order by ordinal, attempt",
            frame=frame,
        )

    def report(self, experiment: str) -> Dict[str, Any]:
        """The family's report: its tables, figures' data and ``verdict`` (``holds``, criteria)."""
        return self._call("GET", f"/api/v1/experiments/{experiment}/report")["report"]

    def sql(self, query: str, timeout: float = 30.0, frame: bool = True) -> Any:
        """A read-only query on the views in schema ``ablate`` (as ``ablate sql``); a
        DataFrame when pandas is installed (and ``frame``), else a list of dicts."""
        answer = self._call("POST", "/api/v1/sql", {"query": query, "timeout_ms": int(timeout * 1000)})
        rows = [dict(zip(answer["columns"], row)) for row in answer["rows"]]
        if frame and _pandas() is not None:
            return _pandas().DataFrame(rows, columns=answer["columns"])
        return rows


class Experiment:
    """One submitted experiment."""

    def __init__(self, client: Client, id: str, trial_count: Optional[int] = None) -> None:
        self.client = client
        self.id = id
        self.trial_count = trial_count
        #: Of the trials the submission stored, how many took earlier results (``reuse``).
        self.reused = 0
        #: With ``into``: the spec's points the experiment held already.
        self.already_held = 0

    def __repr__(self) -> str:
        return f"Experiment({self.id!r})"

    def status(self) -> Dict[str, Any]:
        return self.client.status(self.id)

    def wait(self, poll: float = 1.0, timeout: Optional[float] = None, progress: bool = True) -> Dict[str, Any]:
        """Waits until the experiment ends and returns its status; a progress bar when
        tqdm is installed. A coordinator that restarts or is briefly unreachable is
        waited out, as ``ablate watch`` does."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _progress(progress, self.trial_count)
        try:
            while True:
                try:
                    status = self.status()
                except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
                    status = None
                    if deadline is not None and time.monotonic() > deadline:
                        raise AblateError(f"the coordinator stayed unreachable: {error}") from None
                except AblateError as error:
                    if error.status not in (502, 503, 504):
                        raise
                    status = None
                if status is not None:
                    done = sum(status.get(k) or 0 for k in ("succeeded", "failed", "pruned", "cancelled"))
                    if bar is not None:
                        bar.total = status.get("trials") or bar.total
                        bar.n = done
                        bar.refresh()
                    if status.get("state") != "running":
                        return status
                if deadline is not None and time.monotonic() > deadline:
                    raise AblateError(f"experiment {self.id} still runs after {timeout} s")
                time.sleep(poll)
        finally:
            if bar is not None:
                bar.close()

    def cancel(self) -> int:
        return self.client.cancel(self.id)

    def retry(self, outcomes: Optional[List[str]] = None) -> int:
        return self.client.retry(self.id, outcomes)

    def extend(self, spec: Union[str, Path, Dict[str, Any]], format: Optional[str] = None) -> "Experiment":
        return self.client.extend(self.id, spec, format=format)

    def tag(self, *tags: str, remove: bool = False) -> List[str]:
        return self.client.tag(self.id, *tags, remove=remove)

    def note(self, text: str) -> None:
        self.client.note(self.id, text)

    def delete(self) -> Dict[str, int]:
        return self.client.delete(self.id)

    def trials(self, frame: bool = False) -> Any:
        return self.client.trials(self.id, frame=frame)

    def curves(self, *args: Any, **kwargs: Any) -> Any:
        return self.client.curves(self.id, *args, **kwargs)

    def attempts(self, frame: bool = False) -> Any:
        return self.client.attempts(self.id, frame=frame)

    def report(self) -> Dict[str, Any]:
        return self.client.report(self.id)


def _uuid(text: str) -> str:
    """An id as SQL may hold it: a UUID, or the call is refused here."""
    import uuid

    return str(uuid.UUID(str(text)))


def _quote(text: str) -> str:
    return "'" + str(text).replace("'", "''") + "'"


def _pandas() -> Any:
    try:
        import pandas

        return pandas
    except ImportError:
        return None


def _frame(rows: List[Dict[str, Any]]) -> Any:
    pandas = _pandas()
    if pandas is None:
        raise AblateError("frame=True needs pandas (pip install pandas); without it, the rows are lists of dicts")
    return pandas.DataFrame(rows)


def _progress(wanted: bool, total: Optional[int]) -> Any:
    """A progress bar (tqdm's, a notebook widget in a notebook) when tqdm is installed."""
    if not wanted:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="trial", file=sys.stderr)
