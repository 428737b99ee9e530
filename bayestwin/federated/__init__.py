"""Learning across sites without moving patient rows (issue 22; in progress).

:func:`federated_fit`: a population fitted across sites (hospitals) that keep their rows, by
expectation propagation over sites (:mod:`bayestwin.federated.ep`, the maths; each site's side in
:mod:`bayestwin.federated.site`); :class:`Coordinator`, the same step by step; :class:`Ledger`,
every message that crossed the wire. A federated population saves and loads like any other and
holds no row (what needs rows says so). Each site's side is a :class:`~bayestwin.federated.site.Site`
answering the coordinator's messages: in this process (the local path, the default), or on
Flower (:mod:`bayestwin.federated.flower`, the optional extra ``bayestwin[federated]``).
Differentially private releases: :mod:`bayestwin.privacy`. Guide: ``docs/pages/guides/across-sites.md``.
"""

from bayestwin.federated.ep import Gaussian, SiteError
from bayestwin.federated.fit import Coordinator, Ledger, federated_fit
from bayestwin.federated.site import schema_summary, shared_schema

__all__ = ["Coordinator", "Gaussian", "Ledger", "SiteError", "federated_fit", "schema_summary", "shared_schema"]
