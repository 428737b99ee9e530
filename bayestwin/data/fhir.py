"""FHIR R4 import: a Bundle of Patient, Observation, MedicationAdministration / MedicationRequest and
Condition resources becomes pseudonymised tables, a Cohort or a NONMEM-style event table.

Privacy by construction (HIPAA Safe Harbor, 45 CFR 164.514(b)(2)): only what a model needs is
read, on a whitelist - sex, age at baseline, coded values with their units, doses, and times as
days or hours since the patient's first event. Patient ids become keyed pseudonyms on entry.
Names, addresses, telecom, identifiers (record numbers), photos, contacts, narrative text, notes,
display names of references and exact dates never leave this module; :class:`PrivacyReport` says
which of them were present and dropped, without their values. Ages above 89 become 90 (Safe
Harbor). Error messages name the patient by pseudonym, the bundle entry and the FHIR element, and
never quote a value.

Units: values are converted to each :class:`Measure`'s UCUM unit with pint (UCUM codes are
translated to pint's grammar); mass <-> amount-of-substance conversions use the analyte's molar
mass (built in for common LOINC codes, or ``Measure(molar_mass=...)``). A unit that cannot be
converted is an error, not a silent drop. Codes of Observations that no Measure asks for are
listed in the report (and warned about), not silently dropped.

Validation of the resources is done by ``fhir.resources`` (R4B models, which read R4 bundles of
these resource types).

Statuses are honoured: an Observation that is ``entered-in-error``, ``cancelled`` or only
``registered``, a Condition whose verificationStatus is ``refuted`` or ``entered-in-error``, a
MedicationAdministration not ``completed``/``in-progress`` and a cancelled, draft or erroneous
MedicationRequest are not data; each is counted in the report (``excluded by status``). An empty
Bundle, or one without a Patient, is a :class:`~bayestwin.errors.DataError`.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pandas as pd

from bayestwin.data.pseudonym import PSEUDONYMISED, pseudonymise
from bayestwin.errors import DataError, warn

LOINC = "http://loinc.org"
#: Molar masses (g/mol) of analytes whose LOINC codes come in mass and substance units.
ANALYTES = {
    "2160-0": ("creatinine", 113.12),  # Creatinine [Mass/volume] in Serum or Plasma (mg/dL)
    "14682-9": ("creatinine", 113.12),  # Creatinine [Moles/volume] in Serum or Plasma (umol/L)
    "2345-7": ("glucose", 180.16),  # Glucose [Mass/volume] in Serum or Plasma
    "14749-6": ("glucose", 180.16),  # Glucose [Moles/volume] in Serum or Plasma
    "2339-0": ("glucose", 180.16),  # Glucose [Mass/volume] in Blood
    "15074-8": ("glucose", 180.16),  # Glucose [Moles/volume] in Blood
    "4049-1": ("theophylline", 180.16),  # Theophylline [Mass/volume] in Serum or Plasma
    "3091-6": ("urea nitrogen", 28.014),  # Urea nitrogen [Mass/volume] in Serum or Plasma
}
#: Safe Harbor identifier categories looked for, by FHIR element.
IDENTIFIERS = {
    "name": "names",
    "address": "geographic subdivisions (address)",
    "telecom": "telephone, fax, e-mail (telecom)",
    "identifier": "record, account and other numbers (identifier)",
    "photo": "photographs",
    "contact": "contacts' names and details",
    "text": "narrative text (may hold any identifier)",
    "note": "free-text notes",
    "birthDate": "birth date (converted to age at baseline)",
    "deceasedDateTime": "date of death",
    "generalPractitioner": "care providers",
    "managingOrganization": "organisations",
    "performer": "performers",
    "display": "display names of references",
    "url": "URLs",
}
SUPPORTED = ("Patient", "Observation", "MedicationAdministration", "MedicationRequest", "Condition")


@dataclass(frozen=True)
class Measure:
    """A coded Observation the model uses.

    Parameters
    ----------
    code
        LOINC code (system http://loinc.org), e.g. ``"2160-0"`` (creatinine, mass/volume).
    name
        Column name in the tables, e.g. ``"creatinine"``.
    unit
        UCUM unit the model works in, e.g. ``"umol/L"``; values are converted to it.
    molar_mass
        g/mol, for mass <-> substance conversions (default: :data:`ANALYTES`).
    step, aggregate
        For streams (heart rate every few minutes, continuous glucose): readings are grouped into
        bins of ``step`` time units (starting at the patient's first event) and reduced by
        ``aggregate`` (``"mean"``, ``"median"``, ``"min"``, ``"max"``, ``"last"`` or ``"count"``).
    """

    code: str
    name: str
    unit: str
    molar_mass: float | None = None
    step: float | None = None
    aggregate: str = "mean"


@dataclass
class PrivacyReport:
    """What the import removed or converted (categories and counts; never the values)."""

    removed: Counter = field(default_factory=Counter)  # Safe Harbor category -> elements dropped
    converted: Counter = field(default_factory=Counter)  # what was converted, e.g. dates -> days
    unknown_codes: Counter = field(default_factory=Counter)  # (system, code) -> Observations not used
    unknown_drugs: Counter = field(default_factory=Counter)  # (system, code) -> medication resources not used
    skipped: Counter = field(default_factory=Counter)  # resource type -> entries not read (unsupported)
    units: Counter = field(default_factory=Counter)  # (name, from unit, to unit) -> values converted
    excluded: Counter = field(default_factory=Counter)  # resource and status -> entries not used as data

    def table(self) -> pd.DataFrame:
        rows = [("removed", k, v) for k, v in self.removed.items()]
        rows += [("converted", k, v) for k, v in self.converted.items()]
        rows += [("unknown code", f"{s} {c}", v) for (s, c), v in self.unknown_codes.items()]
        rows += [("unknown medication", f"{s} {c}", v) for (s, c), v in self.unknown_drugs.items()]
        rows += [("resource type not read", k, v) for k, v in self.skipped.items()]
        rows += [("unit converted", f"{n}: {a} -> {b}", v) for (n, a, b), v in self.units.items()]
        rows += [("excluded by status", k, v) for k, v in self.excluded.items()]
        return pd.DataFrame(rows, columns=["action", "what", "count"])

    def __repr__(self) -> str:
        return "PrivacyReport\n" + self.table().to_string(index=False)


@dataclass
class FhirData:
    """A pseudonymised import of a FHIR Bundle.

    Attributes
    ----------
    observations
        One row per (aggregated) value: patient (pseudonym), time (since the patient's first
        event, in ``time_unit``), name, value (in the Measure's unit), unit, entry (bundle index).
    baseline
        One row per patient (index: pseudonym): sex, age (years at the first event, 90 for 90+),
        the first requested therapy (``therapy``) and one 0/1 column per named condition.
    doses
        MedicationAdministrations: patient, time, drug, amount (in ``dose_unit``), duration
        (0 for a bolus / oral dose), route, entry.
    report
        :class:`PrivacyReport`.
    """

    observations: pd.DataFrame
    baseline: pd.DataFrame
    doses: pd.DataFrame
    conditions: pd.DataFrame
    report: PrivacyReport
    time_unit: str
    dose_unit: str

    @property
    def patients(self) -> list[str]:
        return list(self.baseline.index)

    def table(self, outcome: str, *, covariates=(), control: str = "none") -> pd.DataFrame:
        """Long table of the Measure ``outcome``: patient (pseudonym), time, outcome, therapy (the
        first MedicationRequest's drug, ``control`` when none) and the baseline ``covariates`` -
        what ``Cohort(...)`` and ``population.condition(..., key=bt.PSEUDONYMISED)`` take."""
        obs = self.observations[self.observations["name"] == outcome]
        if obs.empty:
            raise DataError(f"no observations of {outcome!r} in the bundle", column=outcome)
        base = self.baseline.copy()
        base["therapy"] = base["therapy"].fillna(control)
        missing = [c for c in covariates if c not in base.columns]
        if missing:
            raise DataError(f"unknown covariate {missing[0]!r}; baseline has {list(base.columns)}", column=missing[0])
        table = obs[["patient", "time", "value"]].rename(columns={"value": "outcome"})
        return table.join(base[["therapy", *covariates]], on="patient").reset_index(drop=True)

    def cohort(self, outcome: str, *, covariates=(), therapies=None, control: str = "none"):
        """A :class:`~bayestwin.Cohort` of :meth:`table` (pseudonyms kept as they are)."""
        from bayestwin.data.cohort import Cohort

        table = self.table(outcome, covariates=covariates, control=control)
        return Cohort(table, covariates=list(covariates), therapies=therapies, key=PSEUDONYMISED)

    def nonmem(self, dv: str, *, drug: str | None = None, covariates=()) -> pd.DataFrame:
        """A NONMEM-style event table (ID, TIME, AMT, DV, EVID, RATE, covariates) of the doses of
        ``drug`` (all when None) and the Measure ``dv``; read it with
        ``bt.read_nonmem(table, key=bt.PSEUDONYMISED, covariates=...)`` (the IDs are pseudonyms)."""
        doses = self.doses if drug is None else self.doses[self.doses["drug"] == drug]
        obs = self.observations[self.observations["name"] == dv]
        if obs.empty:
            raise DataError(f"no observations of {dv!r} in the bundle", column=dv)
        rate = np.where(doses["duration"] > 0, doses["amount"] / doses["duration"].where(doses["duration"] > 0), 0.0)
        d = pd.DataFrame(
            {
                "ID": doses["patient"],
                "TIME": doses["time"],
                "AMT": doses["amount"],
                "DV": np.nan,
                "EVID": 1,
                "RATE": rate,
            }
        )
        o = pd.DataFrame({"ID": obs["patient"], "TIME": obs["time"], "AMT": 0.0, "DV": obs["value"], "EVID": 0})
        o["RATE"] = 0.0
        table = pd.concat([d, o], ignore_index=True)
        for c in covariates:
            if c not in self.baseline.columns:
                raise DataError(f"unknown covariate {c!r}; baseline has {list(self.baseline.columns)}", column=c)
            table[c.upper()] = table["ID"].map(self.baseline[c])
        table = table.sort_values(["ID", "TIME", "EVID"], ascending=[True, True, False], kind="stable")
        return table.reset_index(drop=True)

    def __repr__(self) -> str:
        names = sorted(self.observations["name"].unique()) if len(self.observations) else []
        return (
            f"FhirData({len(self.baseline)} patients, {len(self.observations)} values of {names}, "
            f"{len(self.doses)} doses, {len(self.conditions)} conditions; time in {self.time_unit})"
        )


# ----------------------------------------------------------------------------- units
@lru_cache(maxsize=1)
def _units():
    import pint

    return pint.UnitRegistry()


_UCUM = {
    "Cel": "degC",
    "[degF]": "degF",
    "%": "percent",
    "a": "year",
    "mo": "month",
    "wk": "week",
    "d": "day",
    "h": "hour",
    "[lb_av]": "lb",
    "[in_i]": "inch",
    "[ft_i]": "foot",
    "[oz_av]": "ounce",
    "mm[Hg]": "mmHg",
}


def ucum_to_pint(code: str) -> str:
    """Translate a UCUM unit code (e.g. ``mg/dL``, ``umol/L``, ``{beats}/min``, ``10*3/uL``, ``kg/m2``)
    to pint's grammar."""
    s = re.sub(r"\{[^}]*\}", "", code.strip())  # annotations are dimensionless
    s = re.sub(r"10[*^]([-+]?\d+)", r"1e\1", s)
    if s.startswith("/"):
        s = "1" + s
    if s in ("", "1"):
        return "dimensionless"

    def token(t: str) -> str:
        if t in _UCUM:
            return _UCUM[t]
        m = re.fullmatch(r"([A-Za-z\[\]_]+)([-+]?\d+)", t)  # m2 -> m**2
        return f"{_UCUM.get(m.group(1), m.group(1))}**{m.group(2)}" if m else t

    parts = re.split(r"([./])", s)
    return "".join({".": "*", "/": "/"}.get(p, token(p)) for p in parts)


def convert(value: float, unit: str, target: str, molar_mass: float | None = None) -> float:
    """``value`` in UCUM ``unit`` expressed in UCUM ``target`` (via the molar mass when one is a
    mass and the other an amount of substance). Raises ValueError when impossible."""
    import pint

    ureg = _units()
    try:
        q = ureg.Quantity(value, ucum_to_pint(unit))
        t = ureg.Quantity(1.0, ucum_to_pint(target))
    except (pint.errors.UndefinedUnitError, pint.errors.DefinitionSyntaxError, AttributeError, TypeError) as err:
        raise ValueError(f"unit {unit!r} or {target!r} is not a UCUM unit this import knows") from err
    if q.dimensionality == t.dimensionality:
        return float(q.to(t.units).magnitude)
    if molar_mass is not None:
        mm = ureg.Quantity(molar_mass, "g/mol")
        for cand in (q / mm, q * mm):
            if cand.dimensionality == t.dimensionality:
                return float(cand.to(t.units).magnitude)
    why = "" if molar_mass is not None else " (no molar mass known for this analyte)"
    raise ValueError(f"unit {unit!r} cannot be converted to {target!r}{why}")


# ----------------------------------------------------------------------------- reading
def read_fhir(
    bundle,
    *,
    key,
    measures,
    drugs=None,
    conditions=None,
    time_unit: str = "d",
    dose_unit: str = "mg",
    warn_unknown: bool = True,
) -> FhirData:
    """Read a FHIR R4 Bundle (a dict, JSON text, or a path to a JSON file) into pseudonymised tables.

    Parameters
    ----------
    key
        Your pseudonymisation key: Patient ids become ``pseudonymise(id, key)``, so
        ``bt.reidentify(your_ids, key)`` maps results back.
    measures
        The :class:`Measure` s to read (LOINC code -> column name and unit). Other codes are reported.
    drugs
        Medication code (RxNorm, ATC, ...) -> drug label, for MedicationAdministration (doses) and
        MedicationRequest (the therapy a patient is on). Other codes are reported.
    conditions
        Condition code (SNOMED CT, ICD-10, ...) -> baseline 0/1 column name.
    time_unit
        ``"d"`` (days) or ``"h"`` (hours) since each patient's first event.
    dose_unit
        UCUM unit of the doses' ``amount`` (default mg).

    Examples
    --------
    >>> data = read_fhir("bundle.json", key=KEY, measures=[Measure("2160-0", "creatinine", "umol/L")])  # doctest: +SKIP
    >>> cohort = data.cohort("creatinine", covariates=["age", "sex"])  # doctest: +SKIP
    """
    from pydantic import ValidationError

    if time_unit not in ("d", "h"):
        raise ValueError(f"time_unit must be 'd' (days) or 'h' (hours), not {time_unit!r}")
    raw = _raw(bundle)
    entries = raw.get("entry") or []
    if not isinstance(entries, list):
        raise DataError("Bundle.entry must be a list", column="Bundle.entry")
    if not entries:
        raise DataError("the Bundle has no entries", column="Bundle.entry")
    measures = {m.code: m for m in measures}
    drugs, conditions = dict(drugs or {}), dict(conditions or {})
    report = PrivacyReport()
    owner = _owners(entries, key)  # entry index -> pseudonym (read from the raw JSON, before validation)

    from fhir.resources.R4B import get_fhir_model_class

    parsed = {}
    for i, e in enumerate(entries):
        res = e.get("resource") if isinstance(e, dict) else None
        if not isinstance(res, dict) or "resourceType" not in res:
            raise DataError("bundle entry without a resource", patient=owner.get(i), row=i, column="entry.resource")
        rtype = res["resourceType"]
        if rtype not in SUPPORTED:
            report.skipped[rtype] += 1
            continue
        _count_identifiers(res, report)
        try:
            parsed[i] = get_fhir_model_class(rtype).model_validate(res)
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise DataError(
                f"invalid {rtype}: {_safe(first['msg'], res)}", patient=owner.get(i), row=i, column=f"{rtype}.{loc}"
            ) from None

    patients = {owner[i]: r for i, r in parsed.items() if r.get_resource_type() == "Patient"}
    if not patients:
        raise DataError("the Bundle holds no Patient resource: nothing to import", column="Bundle.entry")
    for i, r in parsed.items():
        if r.get_resource_type() != "Patient" and owner.get(i) is None:
            raise DataError(
                f"{r.get_resource_type()} without a subject reference to a Patient in the bundle",
                row=i,
                column=f"{r.get_resource_type()}.subject",
            )
        if owner.get(i) is not None and owner[i] not in patients:
            raise DataError("reference to a Patient not in the bundle", patient=owner[i], row=i, column="subject")

    # --- events with absolute times (kept inside this function only)
    obs, doses, requests, conds = [], [], [], []
    for i, r in parsed.items():
        kind, pid = r.get_resource_type(), owner.get(i)
        if kind == "Observation":
            obs += _observation(r, i, pid, measures, report)
        elif kind == "MedicationAdministration":
            d = _administration(r, i, pid, drugs, dose_unit, report)
            if d is not None:
                doses.append(d)
        elif kind == "MedicationRequest":
            d = _request(r, i, pid, drugs, report)
            if d is not None:
                requests.append(d)
        elif kind == "Condition":
            code = _coding(r.code)
            status = _coding(r.verificationStatus)
            if status is not None and status[1] in EXCLUDED_CONDITION:
                report.excluded[f"Condition with verificationStatus {status[1]}"] += 1
                continue
            if code is not None and code[1] in conditions:
                conds.append({"patient": pid, "name": conditions[code[1]], "when": _when(r, "onset"), "entry": i})

    # --- relative times: since each patient's first event
    stamps = [(x["patient"], x["when"]) for x in (*obs, *doses, *requests) if x["when"] is not None]
    first = pd.DataFrame(stamps, columns=["patient", "when"]).groupby("patient")["when"].min()
    scale = pd.Timedelta(days=1) if time_unit == "d" else pd.Timedelta(hours=1)

    def rel(rows, name):
        df = pd.DataFrame(rows)
        if df.empty:
            return df
        if df["when"].isna().any():
            j = int(np.argmax(df["when"].isna().to_numpy()))
            raise DataError(f"{name} without a time", patient=df["patient"].iloc[j], row=int(df["entry"].iloc[j]))
        df["time"] = (df["when"] - df["patient"].map(first)) / scale
        report.converted["dates -> time since the patient's first event"] += len(df)
        return df.drop(columns="when")

    obs_df = rel(obs, "Observation")
    obs_df = _aggregate(obs_df, measures) if len(obs_df) else pd.DataFrame(columns=["patient", "time", "name", "value"])
    dose_df = rel(doses, "MedicationAdministration")
    if len(dose_df):
        dose_df["duration"] = dose_df["duration"] / scale
    req_df = rel(requests, "MedicationRequest")
    cond_df = pd.DataFrame(conds)
    if len(cond_df):
        cond_df["time"] = [
            (w - first.get(p, w)) / scale if w is not None else np.nan
            for p, w in zip(cond_df["patient"], cond_df["when"], strict=True)
        ]
        cond_df = cond_df.drop(columns="when")

    # --- baseline
    base = []
    for pid, p in patients.items():
        row = {"patient": pid, "sex": p.gender if p.gender is not None else pd.NA, "age": np.nan}
        if p.birthDate is not None and pid in first.index:
            t0 = first[pid]
            b = pd.Timestamp(p.birthDate).tz_localize(t0.tz) if t0.tz is not None else pd.Timestamp(p.birthDate)
            age = (t0 - b).days / 365.25
            if age < 0:
                raise DataError("birth date after the first event", patient=pid, column="Patient.birthDate")
            row["age"] = min(age, 90.0)  # Safe Harbor: ages over 89 aggregated into 90+
            report.converted["birth date -> age at baseline (90 for 90+)"] += 1
        base.append(row)
    baseline = pd.DataFrame(base).set_index("patient")
    baseline["therapy"] = pd.Series(dtype=object)
    if len(req_df):
        therapy = req_df.sort_values("time", kind="stable").groupby("patient")["drug"].first()
        baseline["therapy"] = baseline.index.map(therapy)
    for name in sorted(set(conditions.values())):
        has = set(cond_df.loc[cond_df["name"] == name, "patient"]) if len(cond_df) else set()
        baseline[name] = [int(p in has) for p in baseline.index]
    if dose_df.empty:
        dose_df = pd.DataFrame(columns=["patient", "time", "drug", "amount", "duration", "route", "entry"])
    if report.unknown_codes and warn_unknown:
        codes = ", ".join(f"{c} ({n}x)" for (_, c), n in report.unknown_codes.most_common(8))
        warn(f"FHIR import: Observations with codes no Measure asks for were not used: {codes}")
    return FhirData(
        observations=obs_df.reset_index(drop=True),
        baseline=baseline,
        doses=dose_df.reset_index(drop=True),
        conditions=cond_df,
        report=report,
        time_unit=time_unit,
        dose_unit=dose_unit,
    )


def _raw(bundle) -> dict:
    if isinstance(bundle, (str, os.PathLike)) and not str(bundle).lstrip().startswith("{"):
        with open(bundle, encoding="utf-8") as f:
            bundle = f.read()
    if isinstance(bundle, str):
        try:
            bundle = json.loads(bundle)
        except json.JSONDecodeError as err:
            raise DataError(f"not JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise DataError("not a FHIR Bundle (resourceType must be 'Bundle')", column="resourceType")
    return bundle


def _owners(entries: list, key) -> dict:
    """Entry index -> pseudonym of the patient it belongs to (Patient.id or subject.reference)."""
    urls, out = {}, {}
    for i, e in enumerate(entries):
        res = e.get("resource") if isinstance(e, dict) else None
        if isinstance(res, dict) and res.get("resourceType") == "Patient" and res.get("id") is not None:
            pid = pseudonymise(res["id"], key)
            out[i] = pid
            urls[f"Patient/{res['id']}"] = pid
            if isinstance(e.get("fullUrl"), str):
                urls[e["fullUrl"]] = pid
    for i, e in enumerate(entries):
        res = e.get("resource") if isinstance(e, dict) else None
        if isinstance(res, dict) and res.get("resourceType") != "Patient":
            ref = (res.get("subject") or res.get("patient") or {}).get("reference")
            if isinstance(ref, str):
                out[i] = urls.get(ref, urls.get(ref.split("/_history")[0]))
                if out[i] is None and ref.startswith("Patient/"):
                    out[i] = pseudonymise(ref.split("/")[1], key)  # a patient not in the bundle: reported later
    return out


def _count_identifiers(res: dict, report: PrivacyReport) -> None:
    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "display" and "code" in x:
                    pass  # a coding's display: the code's label, not a person
                elif k in IDENTIFIERS and k != "url":
                    report.removed[IDENTIFIERS[k]] += 1
                elif k == "url" and isinstance(v, str) and not v.startswith("http://hl7.org"):
                    report.removed[IDENTIFIERS["url"]] += 1
                if k in ("effectiveDateTime", "authoredOn", "onsetDateTime", "issued", "recordedDate"):
                    report.removed["exact dates (kept only as time since the first event)"] += 1
                if k not in IDENTIFIERS or k == "url":
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(res)


def _safe(msg: str, res: dict) -> str:
    """A validation message without any value of the resource in it."""
    out = msg

    def values(x):
        if isinstance(x, dict):
            for v in x.values():
                yield from values(v)
        elif isinstance(x, list):
            for v in x:
                yield from values(v)
        elif isinstance(x, str) and len(x) >= 3:
            yield x

    for v in sorted(set(values(res)), key=len, reverse=True):
        out = out.replace(v, "<value>")
    return out


def _coding(concept, systems=None):
    """(system, code) of the first coding (of ``systems`` when given), or None."""
    if concept is None or not concept.coding:
        return None
    for c in concept.coding:
        if systems is None or c.system in systems:
            return (c.system or "", c.code or "")
    return None


def _when(r, prefix: str):
    t = getattr(r, f"{prefix}DateTime", None)
    if t is None and getattr(r, f"{prefix}Period", None) is not None:
        t = getattr(r, f"{prefix}Period").start
    if t is None and prefix == "effective":
        t = getattr(r, "effectiveInstant", None)
    return _stamp(t)


def _stamp(t):
    if t is None:
        return None
    ts = pd.Timestamp(t)
    return ts.tz_convert("UTC") if ts.tz is not None else ts.tz_localize("UTC")


#: Statuses whose resources are not data (FHIR R4 value sets): counted in the report, not used.
EXCLUDED_OBSERVATION = ("entered-in-error", "cancelled", "registered")
EXCLUDED_CONDITION = ("refuted", "entered-in-error")


def _observation(r, i, pid, measures, report) -> list:
    if r.status in EXCLUDED_OBSERVATION:
        report.excluded[f"Observation with status {r.status}"] += 1
        return []
    rows = []
    parts = [(r.code, r.valueQuantity)] + [(c.code, c.valueQuantity) for c in (r.component or [])]
    for code, q in parts:
        loinc = _coding(code, (LOINC,))
        if loinc is None or loinc[1] not in measures:
            report.unknown_codes[_coding(code) or ("", "no code")] += 1
            continue
        m = measures[loinc[1]]
        if q is None or q.value is None:
            raise DataError(f"Observation {m.code} ({m.name}) without a valueQuantity", patient=pid, row=i)
        unit = q.code or q.unit
        if unit is None:
            raise DataError(f"value of {m.name} without a unit", patient=pid, row=i, column="valueQuantity.code")
        mm = m.molar_mass if m.molar_mass is not None else ANALYTES.get(m.code, (None, None))[1]
        try:
            value = convert(float(q.value), unit, m.unit, mm)
        except ValueError as err:
            raise DataError(
                f"{m.name} (LOINC {m.code}): {err}", patient=pid, row=i, column="valueQuantity.code"
            ) from None
        if unit != m.unit:
            report.units[(m.name, unit, m.unit)] += 1
        rows.append({"patient": pid, "when": _when(r, "effective"), "name": m.name, "value": value, "entry": i})
    return rows


def _drug(concept, drugs, report):
    code = _coding(concept)
    if code is None or code[1] not in drugs:
        report.unknown_drugs[code or ("", "no code")] += 1
        return None
    return drugs[code[1]]


def _administration(r, i, pid, drugs, dose_unit, report):
    if r.status not in (None, "completed", "in-progress"):
        report.excluded[f"MedicationAdministration with status {r.status} (not a dose given)"] += 1
        return None
    drug = _drug(r.medicationCodeableConcept, drugs, report)
    if drug is None:
        return None
    dose = r.dosage.dose if r.dosage is not None else None
    if dose is None or dose.value is None:
        raise DataError("MedicationAdministration without dosage.dose", patient=pid, row=i, column="dosage.dose")
    try:
        amount = convert(float(dose.value), dose.code or dose.unit or "", dose_unit)
    except ValueError as err:
        raise DataError(f"dose of {drug}: {err}", patient=pid, row=i, column="dosage.dose.code") from None
    when, duration = _when(r, "effective"), pd.Timedelta(0)
    if r.effectivePeriod is not None and r.effectivePeriod.end is not None and r.effectivePeriod.start is not None:
        duration = _stamp(r.effectivePeriod.end) - _stamp(r.effectivePeriod.start)
        if duration < pd.Timedelta(0):
            raise DataError("infusion ends before it starts", patient=pid, row=i, column="effectivePeriod")
    route = r.dosage.route.coding[0].display if r.dosage.route is not None and r.dosage.route.coding else None
    return {
        "patient": pid,
        "when": when,
        "drug": drug,
        "amount": amount,
        "duration": duration,
        "route": route,
        "entry": i,
    }


def _request(r, i, pid, drugs, report):
    if r.status in ("cancelled", "entered-in-error", "draft"):
        report.excluded[f"MedicationRequest with status {r.status}"] += 1
        return None
    drug = _drug(r.medicationCodeableConcept, drugs, report)
    if drug is None:
        return None
    return {"patient": pid, "when": _stamp(r.authoredOn), "drug": drug, "entry": i}


def _aggregate(df: pd.DataFrame, measures: dict) -> pd.DataFrame:
    """Streams binned into model time steps; other measures kept as they are."""
    out = []
    by_name = {m.name: m for m in measures.values()}
    for name, g in df.groupby("name", sort=False):
        m = by_name[name]
        if m.step is None:
            out.append(g)
            continue
        g = g.assign(time=np.floor(g["time"] / m.step) * m.step)
        how = {"last": "last", "count": "count"}.get(m.aggregate, m.aggregate)
        agg = g.sort_values("time", kind="stable").groupby(["patient", "time"], as_index=False)
        red = agg.agg(value=("value", how), entry=("entry", "min"))
        red["name"] = name
        out.append(red)
    res = pd.concat(out, ignore_index=True)
    return res.sort_values(["patient", "name", "time"], kind="stable")[["patient", "time", "name", "value", "entry"]]
