"""Running a compiled twin program over many patients: fixed-size chunks spread over devices."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from bayestwin.settings import progress_bar


def run_chunked(run, data: dict, mask: np.ndarray, seeds: np.ndarray, chunk: int):
    """``run`` over fixed-size chunks of patients; numpy results concatenated along patients.

    Fixed-size chunks let one compiled program serve any number of patients (the last chunk is
    padded by repeating its last patient). XLA on CPU also stalled on some large vmapped batches,
    e.g. exactly 100 or 200 patients, in our runs. Chunks alternate between local devices.
    """
    n = len(seeds)  # every call has the full chunk's shape: a new shape would compile again
    devices = local_devices()
    starts = list(range(0, n, chunk))
    result = {}  # leaf path -> preallocated (n, ...) array, filled chunk by chunk in the workers
    bar = progress_bar(total=n, desc="twins", show=None if len(starts) > 1 else False)

    def one(lo):
        idx = np.minimum(np.arange(lo, lo + chunk), n - 1)
        device = devices[(lo // chunk) % len(devices)]
        out = run({k: v[idx] for k, v in data.items()}, mask[idx], seeds[idx], device)
        keep = int(min(chunk, n - lo))
        leaves, treedef = jax.tree_util.tree_flatten(out)
        for i, leaf in enumerate(leaves):
            a = np.asarray(leaf)  # waits for this chunk only
            if i not in result:
                result.setdefault(i, np.empty((n, *a.shape[1:]), a.dtype))
            result[i][lo : lo + keep] = a[:keep]
        bar.update(keep)
        return treedef

    # One thread per device: XLA runs a CPU device's program on the calling thread with the GIL
    # released, so threads let chunks on different cores overlap (and copy out in parallel).
    with bar, ThreadPoolExecutor(len(devices)) as pool:
        treedefs = list(pool.map(one, starts))
    return jax.tree_util.tree_unflatten(treedefs[0], [result[i] for i in range(len(result))])


def local_devices() -> list:
    """Devices to spread chunks over: every accelerator, or on CPU one host device per core
    (at most ``$BAYESTWIN_CPU_DEVICES``).

    (PyMC's JAX module asks XLA for 100 host devices; a program is compiled once per device it
    runs on, so rotating over all of them would mostly compile.)
    """
    devices = jax.local_devices()
    if devices[0].platform == "cpu":  # $BAYESTWIN_CPU_DEVICES caps it, e.g. 1 in a Dask worker owning one core
        given = os.environ.get("BAYESTWIN_CPU_DEVICES", "").strip()
        if given and not (given.isdigit() and int(given) >= 1):
            raise ValueError(f"$BAYESTWIN_CPU_DEVICES must be a whole number of CPU devices (e.g. 1), not {given!r}")
        cores = int(given or os.cpu_count() or 1)
        devices = devices[: max(1, min(len(devices), cores))]
    return devices


def chain_groups(chains: int) -> list[tuple]:
    """``(device, chain indices)`` for each group of a fit's chains: as many equal groups as
    there are :func:`local_devices` (at most one per chain), so that chains on different cores
    or accelerators run at the same time. One group, all chains on the default device, on one
    device.

    Why: numpyro's vectorised chains are one program on one device, and XLA runs it on one core:
    a 4-chain fit on a 2-core machine left the other core idle (a 50-subject Friberg fit: user
    21 min in 20.7 min wall). Each group is still vectorised, and each chain keeps its own key,
    so the chains are the same whichever way they are grouped.
    """
    devices = local_devices()
    n = max(g for g in range(1, min(len(devices), chains) + 1) if chains % g == 0)
    size = chains // n
    return [(devices[g], np.arange(g * size, (g + 1) * size)) for g in range(n)]
