"""Learning across sites without moving patient rows (issue 22; in progress).

:mod:`bayestwin.federated.ep`: expectation propagation over sites, the maths of a federated
population fit. Not yet wired to the population fit or to a federation framework.
"""
