"""Synthetic FHIR R4 Bundles for demos, notebooks and tests - full of (fake) identifiers on purpose.

Every patient has a name, an address, a phone number, an e-mail, a medical record number, a birth
date, a narrative with the name in it, and notes and performers naming people: what a real EHR
export carries. The import must drop all of them (:mod:`bayestwin.data.fhir`).
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"
#: RxNorm codes used for the progression example's therapies (labels are the simulator's).
THERAPY_CODES = {"standard": "6809", "drug_a": "1373458", "drug_b": "1545653"}
THEOPHYLLINE = "10438"
DIABETES = "44054006"
_FIRST = ["Jane", "John", "Maria", "Ahmed", "Li", "Olga", "Kwame", "Sofia", "Pedro", "Aiko", "Noor", "Liam"]
_LAST = ["Doe", "Smith", "Garcia", "Khan", "Wang", "Petrova", "Mensah", "Rossi", "Silva", "Sato", "Haddad", "Byrne"]
_CITIES = ["Springfield", "Riverton", "Lakeside", "Hillview", "Brookfield", "Fairhaven"]


def _person(i: int, rng) -> dict:
    given, family = _FIRST[i % len(_FIRST)], _LAST[(i * 7 + 3) % len(_LAST)] + f"{i:03d}"
    return {
        "given": given,
        "family": family,
        "mrn": f"MRN-{100000 + i * 37:06d}",
        "phone": f"555-{rng.integers(1000, 9999)}-{i:04d}",
        "email": f"{given.lower()}.{family.lower()}@example.org",
        "street": f"{rng.integers(1, 999)} {_LAST[i % len(_LAST)]} Street",
        "city": _CITIES[i % len(_CITIES)],
        "zip": f"{rng.integers(10000, 99999)}",
        "doctor": f"Dr. {_LAST[(i + 5) % len(_LAST)]}",
    }


def _patient(fhir_id: str, p: dict, sex: str, birth: dt.date) -> dict:
    name = f"{p['given']} {p['family']}"
    return {
        "resourceType": "Patient",
        "id": fhir_id,
        "text": {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{name}, {p["mrn"]}</div>'},
        "identifier": [{"system": "urn:example:mrn", "value": p["mrn"]}],
        "name": [{"family": p["family"], "given": [p["given"]]}],
        "telecom": [{"system": "phone", "value": p["phone"]}, {"system": "email", "value": p["email"]}],
        "gender": {"M": "male", "F": "female"}.get(sex, sex),
        "birthDate": birth.isoformat(),
        "address": [{"line": [p["street"]], "city": p["city"], "postalCode": p["zip"], "country": "US"}],
        "generalPractitioner": [{"display": p["doctor"]}],
    }


def _quantity(value: float, unit: str) -> dict:
    return {"value": round(float(value), 6), "unit": unit, "system": UCUM, "code": unit}


def _observation(ref, code, display, when, value, unit, p=None) -> dict:
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
        "subject": {"reference": ref},
        "effectiveDateTime": when.isoformat(),
        "valueQuantity": _quantity(value, unit),
    }
    if p is not None:
        obs["performer"] = [{"display": p["doctor"]}]
        obs["note"] = [{"text": f"Seen {p['given']} {p['family']} in clinic"}]
    return obs


def example_bundle(
    kind: str = "progression", n_patients: int = 30, *, seed: int = 0, heart_rate: bool = True, first_id: int = 0
):
    """A Bundle (dict) of ``n_patients`` synthetic patients, the truth behind it, and the identifiers used.

    ``kind="progression"``: creatinine over visits (days 0, 3, ..., from
    :func:`bayestwin.families.progression.simulate`, outcome read as creatinine in umol/L; odd
    patients report LOINC 2160-0 in mg/dL, even ones 14682-9 in umol/L), the therapy as a
    MedicationRequest (RxNorm), type 2 diabetes as a Condition for some, and for every third
    patient a heart-rate stream every 5 minutes over the first two days (LOINC 8867-4).
    ``kind="pk"``: one oral theophylline dose (some recorded in g) and levels (LOINC 4049-1, in
    ug/mL or mg/L) at the simulator's times, in hours.

    ``first_id`` numbers the patients (ids, names, record numbers) from there: bundles with
    different ``first_id`` hold different people.

    Returns (bundle, truth, identifiers): ``truth`` is the simulator's table keyed by FHIR id,
    ``identifiers`` every identifying string written into the bundle (for privacy scans).
    """
    rng = np.random.default_rng(seed)
    start = dt.datetime(2024, 3, 1, 8, 0, tzinfo=dt.UTC)
    entries, idents = [], set()
    if kind == "progression":
        from bayestwin.families.progression import simulate

        table, _ = simulate(n_patients=n_patients, seed=seed)
    elif kind == "pk":
        from bayestwin.families.pk import simulate

        table, _ = simulate(n_patients, seed=seed, times=(0.5, 1, 2, 4, 8, 12, 24))
        table = table.rename(columns={"ID": "patient"})
    else:
        raise ValueError(f"kind must be 'progression' or 'pk', not {kind!r}")
    ids = list(pd.unique(table["patient"]))
    truth = []
    for i, pat in enumerate(ids):
        rows = table[table["patient"] == pat]
        p = _person(first_id + i, rng)
        fhir_id = f"pt-{first_id + i:04d}-{p['mrn'][-4:]}"
        ref = f"Patient/{fhir_id}"
        t0 = start + dt.timedelta(days=int(rng.integers(0, 300)), minutes=int(rng.integers(0, 600)))
        age = float(rows["age"].iloc[0]) if "age" in rows else float(rng.integers(25, 80))
        sex = rows["sex"].iloc[0] if "sex" in rows else ("F" if i % 2 else "M")
        birth = (t0 - dt.timedelta(days=age * 365.25 + 100)).date()
        entries.append({"fullUrl": f"urn:uuid:{fhir_id}", "resource": _patient(fhir_id, p, sex, birth)})
        idents |= {p[k] for k in ("given", "family", "mrn", "phone", "email", "street", "city", "zip", "doctor")}
        idents |= {fhir_id, birth.isoformat(), t0.date().isoformat()}
        if kind == "progression":
            therapy = rows["therapy"].iloc[0]
            entries.append(
                {
                    "resource": {
                        "resourceType": "MedicationRequest",
                        "status": "active",
                        "intent": "order",
                        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": THERAPY_CODES[therapy]}]},
                        "subject": {"reference": ref},
                        "authoredOn": t0.isoformat(),
                        "requester": {"display": p["doctor"]},
                    }
                }
            )
            for _, r in rows.iterrows():
                when = t0 + dt.timedelta(days=float(r["time"]))
                if i % 2:
                    obs = _observation(ref, "2160-0", "Creatinine", when, r["outcome"] / (10_000 / 113.12), "mg/dL", p)
                else:
                    obs = _observation(ref, "14682-9", "Creatinine", when, r["outcome"], "umol/L", p)
                entries.append({"resource": obs})
            if i % 4 == 1:
                entries.append(
                    {
                        "resource": {
                            "resourceType": "Condition",
                            "code": {"coding": [{"system": SNOMED, "code": DIABETES, "display": "Type 2 diabetes"}]},
                            "subject": {"reference": ref},
                            "onsetDateTime": (t0 - dt.timedelta(days=400)).isoformat(),
                            "note": [{"text": f"{p['given']} reports polyuria"}],
                        }
                    }
                )
            if heart_rate and i % 3 == 0:
                for k in range(0, 2 * 24 * 12):  # every 5 minutes for 2 days
                    when = t0 + dt.timedelta(minutes=5 * k)
                    hr = 70 + 8 * np.sin(2 * np.pi * k / 288) + rng.normal(0, 3)
                    entries.append({"resource": _observation(ref, "8867-4", "Heart rate", when, hr, "/min")})
            truth.append(rows.assign(fhir_id=fhir_id))
        else:
            dose = rows[rows["EVID"] == 1]
            for _, d in dose.iterrows():
                amount, unit = (d["AMT"] / 1000, "g") if i % 3 == 0 else (d["AMT"], "mg")
                entries.append(
                    {
                        "resource": {
                            "resourceType": "MedicationAdministration",
                            "status": "completed",
                            "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": THEOPHYLLINE}]},
                            "subject": {"reference": ref},
                            "effectiveDateTime": (t0 + dt.timedelta(hours=float(d["TIME"]))).isoformat(),
                            "performer": [{"actor": {"display": p["doctor"]}}],
                            "dosage": {
                                "route": {"coding": [{"system": SNOMED, "code": "26643006", "display": "Oral"}]},
                                "dose": _quantity(amount, unit),
                            },
                        }
                    }
                )
            for _, r in rows[rows["EVID"] == 0].iterrows():
                when = t0 + dt.timedelta(hours=float(r["TIME"]))
                unit = "ug/mL" if i % 2 else "mg/L"
                obs = _observation(ref, "4049-1", "Theophylline", when, r["DV"], unit, p)
                entries.append({"resource": obs})
            truth.append(rows.assign(fhir_id=fhir_id))
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": entries}
    return bundle, pd.concat(truth, ignore_index=True), sorted(idents)
