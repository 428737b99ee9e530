"""A federated population fit on Flower: the coordinator a ``ServerApp``, each site a ``ClientApp``.

The exchange is the local path's (:class:`~bayestwin.federated.fit.Coordinator` and
:class:`~bayestwin.federated.site.Site`), carried by Flower messages instead of function calls:
the coordinator's :class:`FlowerSite` sends each request as a Flower ``Message`` (message type
``"query"``, one ``ConfigRecord`` holding the request's kind and its JSON body) to the site's
SuperNode, whose ``ClientApp`` (:func:`site_app`) answers it with the site's
:meth:`Site.answer <bayestwin.federated.site.Site.answer>`. Rows never leave the site's process;
the coordinator's :class:`~bayestwin.federated.fit.Ledger` logs every body that crossed.

- :func:`coordinator_app` and :func:`site_app` build the two apps, for any Flower runtime: the
  simulation engine on one machine, or a deployment (a SuperLink, one SuperNode per hospital,
  ``flwr run``): give the ServerApp an ``out`` folder to save the population into.
- :func:`flower_fit` runs both on Flower's simulation engine (Ray; one virtual SuperNode per
  site, each site's ``ClientApp`` in a Ray worker process) and returns the population.

A site's ``ClientApp`` keeps the agreed shared schema in Flower's ``context.state`` (which Flower
keeps per node across messages), so a site answers a cavity whichever worker process serves it.
A site that fails answers with its error, which the coordinator raises as a
:class:`~bayestwin.federated.ep.SiteError` naming the site (its state stays that of the last
complete sweep); a site that does not answer within ``timeout`` seconds is named the same way.

Needs the optional extra: ``pip install "bayestwin[federated]"`` (``flwr[simulation]``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from bayestwin.data.cohort import Cohort
from bayestwin.federated.ep import SiteError
from bayestwin.federated.site import Site

#: The Flower record that carries bayestwin's messages, and the message type they travel as.
RECORD, MESSAGE_TYPE = "bayestwin", "query"


def _flwr():
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise ImportError(
            'the Flower path needs Flower: pip install "bayestwin[federated]" (flwr[simulation])'
        ) from None
    from flwr.app import ConfigRecord, Message, RecordDict

    return ConfigRecord, Message, RecordDict


def _envelope(**fields) -> dict:
    """A message's content: one ConfigRecord with string values (kind, JSON body, site, error)."""
    ConfigRecord, _, RecordDict = _flwr()
    return RecordDict({RECORD: ConfigRecord({k: str(v) for k, v in fields.items()})})


# --------------------------------------------------------------------------------- the site
def site_app(load: Callable[[object], tuple[str, Cohort]]):
    """A Flower ``ClientApp`` serving one site per SuperNode.

    ``load(context)`` returns ``(site name, that site's Cohort)`` for the node the app runs on,
    e.g. from ``context.node_config`` (a path to the hospital's table in a deployment; the
    simulation engine's ``partition-id`` in :func:`flower_fit`). It is called once per node and
    process; its rows stay in the process.

    Requests of kind ``"name"`` are answered with the site's name (how the coordinator learns
    which node is which site); every other kind by :meth:`Site.answer`. The reply carries the
    answer's JSON, or the site's error.
    """
    from flwr.clientapp import ClientApp

    _, Message, _ = _flwr()
    app = ClientApp()
    sites: dict[int, Site] = {}  # per node, in this process

    @app.query()
    def answer(msg, context):
        node = int(context.node_id)
        name = "?"
        try:
            if node not in sites:
                name, cohort = load(context)
                sites[node] = Site(str(name), cohort)
            site = sites[node]
            name = site.name
            record = msg.content[RECORD]
            kind, body = str(record["kind"]), json.loads(str(record["body"]))
            if kind == "name":
                reply = {}
            else:
                state = context.state
                if kind == "shared schema":  # kept by Flower for this node's later messages
                    state[RECORD] = _envelope(shared=json.dumps(body))[RECORD]
                elif kind == "cavity" and not site.agreed and RECORD in state:
                    site.answer("shared schema", json.loads(str(state[RECORD]["shared"])))
                reply = site.answer(kind, body)
            content = _envelope(site=name, body=json.dumps(reply), error="")
        except Exception as err:  # noqa: BLE001 - the site's failure goes back, named, to the coordinator
            content = _envelope(site=name, body="null", error=f"{type(err).__name__}: {err}")
        return Message(content, reply_to=msg)

    return app


# -------------------------------------------------------------------------- the coordinator
class FlowerSite:
    """The coordinator's handle on a site at a Flower node: ``answer(kind, body)`` sends the
    request as a Flower message and waits for the site's reply (at most ``timeout`` seconds)."""

    def __init__(self, grid, node_id: int, name: str, timeout: float = 3600.0):
        self.grid, self.node_id, self.name, self.timeout = grid, int(node_id), str(name), float(timeout)

    def __repr__(self) -> str:
        return f"FlowerSite({self.name!r}, node {self.node_id})"

    def _request(self, kind: str, body: Mapping):
        _, Message, _ = _flwr()
        return Message(_envelope(kind=kind, body=json.dumps(body)), dst_node_id=self.node_id, message_type=MESSAGE_TYPE)

    def _read(self, reply, kind: str) -> dict:
        if reply is None:
            raise SiteError(f"site {self.name!r} did not answer a {kind!r} message within {self.timeout:g} s")
        if reply.has_error():
            raise SiteError(f"site {self.name!r}: Flower reports {reply.error.code}: {reply.error.reason}")
        record = reply.content[RECORD]
        if str(record["error"]):
            raise SiteError(f"site {self.name!r} failed: {record['error']}")
        return json.loads(str(record["body"]))

    def answer(self, kind: str, body: Mapping) -> dict:
        replies = list(self.grid.send_and_receive([self._request(kind, body)], timeout=self.timeout))
        return self._read(replies[0] if replies else None, kind)

    @staticmethod
    def answer_all(handles: list[FlowerSite], kind: str, bodies: list[Mapping]) -> list:
        """Send one request to each site at once (the sites work at the same time) and return
        each site's answer, or the :class:`SiteError` it gave, in the order of ``handles``."""
        if len({id(h.grid) for h in handles}) > 1:  # not one federation: one at a time
            return [FlowerSite._try(h.answer, kind, b) for h, b in zip(handles, bodies, strict=True)]
        requests = [h._request(kind, b) for h, b in zip(handles, bodies, strict=True)]
        by_node = _send_all(handles[0].grid, requests, max(h.timeout for h in handles))
        return [FlowerSite._try(h._read, by_node.get(h.node_id), kind) for h in handles]

    @staticmethod
    def _try(fn, *args):
        try:
            return fn(*args)
        except SiteError as err:
            return err


def _send_all(grid, requests: list, timeout: float) -> dict:
    """Send the requests at once and return the replies that came back, by the node that sent each."""
    return {int(r.metadata.src_node_id): r for r in grid.send_and_receive(requests, timeout=timeout)}


def _site_names(grid, nodes: list[int], timeout: float) -> dict[str, FlowerSite]:
    """Ask every node at once which site it is (a ``"name"`` request; the name comes in the
    reply's envelope); return a handle per site name."""
    asked = [FlowerSite(grid, node, f"node {node}", timeout) for node in nodes]
    by_node = _send_all(grid, [h._request("name", {}) for h in asked], timeout)
    handles: dict[str, FlowerSite] = {}
    for node in nodes:
        reply = by_node.get(node)
        if reply is None or reply.has_error():
            raise SiteError(f"node {node} did not say which site it is within {timeout:g} s")
        record = reply.content[RECORD]
        if str(record["error"]):
            raise SiteError(f"node {node} failed to load its site: {record['error']}")
        site = str(record["site"])
        if site in handles:
            raise SiteError(f"two nodes ({handles[site].node_id} and {node}) say they are site {site!r}")
        handles[site] = FlowerSite(grid, node, site, timeout)
    return handles


def _nodes(grid, n: int, timeout: float) -> list[int]:
    """The ids of ``n`` connected nodes, waiting at most ``timeout`` seconds for them."""
    start = time.monotonic()
    while True:
        nodes = sorted(int(x) for x in grid.get_node_ids())
        if len(nodes) >= n:
            return nodes[:n]
        if time.monotonic() - start > timeout:
            raise SiteError(f"{len(nodes)} of {n} sites connected within {timeout:g} s")
        time.sleep(0.2)


#: federated_fit's settings the Flower apps take as they are: the coordinator's, then EP's sweeps
COORDINATOR = ("therapies", "draws", "tune", "chains", "target_accept", "seed")
SWEEPS = ("iterations", "damping", "tol")


def _settings(fit: Mapping) -> tuple[dict, dict]:
    unknown = sorted(set(fit) - set(COORDINATOR) - set(SWEEPS))
    if unknown:
        raise TypeError(f"unknown settings {unknown}: a federated fit takes {[*COORDINATOR, *SWEEPS]}")
    return {k: fit[k] for k in COORDINATOR if k in fit}, {k: fit[k] for k in SWEEPS if k in fit}


def coordinate(grid, sites: int, family="progression", *, timeout: float = 3600.0, ledger=None, **fit):
    """Run the federated fit over the ``sites`` nodes connected to Flower's ``grid`` (inside a
    ``ServerApp``'s main); return ``(population, coordinator)``.

    It waits for ``sites`` nodes (at most ``timeout`` seconds), asks each its site's name, then
    runs :class:`~bayestwin.federated.fit.Coordinator` with a :class:`FlowerSite` per node, the
    sites in the order of their names; ``fit``: the settings of
    :func:`~bayestwin.federated.fit.federated_fit` (therapies, draws, tune, chains,
    target_accept, seed, iterations, damping, tol). A site's error, or a site that does not
    answer, raises :class:`SiteError` naming it.
    """
    from bayestwin.federated.fit import Coordinator

    settings, sweeps = _settings(fit)
    handles = _site_names(grid, _nodes(grid, sites, timeout), timeout)
    coord = Coordinator(dict(sorted(handles.items())), family, ledger=ledger, **settings)
    coord.run(**sweeps)
    return coord.population(), coord


def coordinator_app(
    sites: int,
    family="progression",
    *,
    timeout: float = 3600.0,
    out: str | Path | None = None,
    done: Callable | None = None,
    failed: Callable[[BaseException], None] | None = None,
    ledger=None,
    **fit,
):
    """A Flower ``ServerApp`` that runs the federated fit over ``sites`` connected sites
    (:func:`coordinate`, with these settings, checked here).

    The population is saved to ``out`` (``bt.save``: atomic, refuses a folder it did not write)
    and handed to ``done(population, coordinator)`` when given. If the fit fails (a site's
    error, a site that does not answer: :class:`SiteError`), ``failed(error)`` is called before
    the error ends the run (Flower logs it; the coordinator's state is that of its last
    complete sweep). A deployment whose settings come with each run (``flwr run``'s run
    config): :mod:`bayestwin.federated.deploy`.
    """
    from flwr.serverapp import ServerApp

    _settings(fit)
    if out is not None:
        from bayestwin.io import check_target

        check_target(out)  # refused now, not after the fit
    app = ServerApp()

    @app.main()
    def main(grid, context):
        try:
            population, coord = coordinate(grid, sites, family, timeout=timeout, ledger=ledger, **fit)
        except Exception as err:
            if failed is not None:
                failed(err)
            raise
        if out is not None:
            from bayestwin.io import save

            save(population, out)
        if done is not None:
            done(population, coord)

    return app


def flower_fit(
    sites: Mapping[str, Cohort],
    family="progression",
    *,
    ledger=None,
    cpus_per_site: float = 1.0,
    timeout: float = 3600.0,
    **fit,
):
    """:func:`~bayestwin.federated.fit.federated_fit` on Flower's simulation engine.

    One virtual SuperNode per site, each site's ``ClientApp`` in a Ray worker process (with
    ``cpus_per_site`` CPUs); the coordinator's ``ServerApp`` in this process. ``fit``: the
    settings of ``federated_fit`` (therapies, draws, tune, chains, target_accept, seed,
    iterations, damping, tol); the result is the local path's population: with the same seed
    and XLA flags, the sites send and receive the local path's messages byte for byte.
    """
    from flwr.simulation import run_simulation

    from bayestwin.federated.site import check_cohort

    if not isinstance(sites, Mapping) or not sites:
        raise ValueError("sites must be a non-empty mapping of site name -> that site's bt.Cohort")
    table = [(str(k), check_cohort(c, str(k))) for k, c in sites.items()]

    def load(context):
        return table[int(context.node_config["partition-id"])]

    result: dict = {}

    def done(population, coord):
        result["population"] = population

    def failed(err):
        result["error"] = err

    server = coordinator_app(len(table), family, timeout=timeout, done=done, failed=failed, ledger=ledger, **fit)
    run_simulation(
        server_app=server,
        client_app=site_app(load),
        num_supernodes=len(table),
        backend_config={"client_resources": {"num_cpus": cpus_per_site}},
    )
    if "error" in result:
        raise result["error"]
    if "population" not in result:
        raise SiteError("the federated fit on Flower ended without a population (see the log above)")
    return result["population"]
