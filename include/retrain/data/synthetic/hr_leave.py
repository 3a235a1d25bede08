"""Synthetic hr_leave traffic: leave requests and the decision the HR policy (HR_POLICY, hr_decision) gives for them."""

from __future__ import annotations

import random
from typing import Any

from retrain.data.synthetic.pii import (
    pick, pii_dni, pii_email, pii_iban, pii_phone_es, pii_phone_us, pii_ssn,
)

# --- hr_leave ------------------------------------------------------------------------------------------
# Policy table from seed 002, plus the advance-notice rule it tells the analyst to check.
HR_POLICY: dict[str, dict[str, Any]] = {
    "casual_leave": {"max": 3, "quota": 12, "approvers": ["manager"], "notice": 1},
    "sick_leave": {"max": 5, "quota": 12, "approvers": ["manager"], "notice": 0},
    "annual_leave": {"max": 15, "quota": 21, "approvers": ["manager", "hr"], "notice": 7},
}
_LEAVE_TYPES = ("casual_leave", "sick_leave", "annual_leave")
_HR_FIRST = ("John", "Jane", "Ana", "Luis", "María", "Pedro", "Emily", "Michael", "Sofía", "Carlos", "Laura",
             "David", "Lucía", "Jorge", "Sarah", "Priya", "Wei", "Fatima", "Omar", "Elena")
_HR_LAST = ("Doe", "Smith", "García", "López", "Martínez", "Johnson", "Brown", "Fernández", "Chen", "Patel",
            "Rodríguez", "Khan", "Müller", "Rossi", "Silva", "Navarro")
_HR_DEPTS = ("Engineering", "Sales", "Finance", "Operations", "Marketing", "Support", "Legal")
_HR_REASONS = {
    "casual_leave": ("family event", "moving house", "personal errands", "child's school event", "wedding of a friend"),
    "sick_leave": ("flu", "medical procedure", "back pain", "fever", "dental surgery"),
    "annual_leave": ("summer vacation", "trip to Japan", "family holiday", "visiting relatives", "rest"),
}


def _days(n: int) -> str:
    return "1 day" if n == 1 else f"{n} days"


def hr_decision(leave_type: str, duration: int, balance: int, notice: int) -> dict:
    """The true label for a leave request under HR_POLICY (exposed so tests and docs share one rule)."""
    pol = HR_POLICY[leave_type]
    human = leave_type.replace("_", " ")
    mx, min_notice = pol["max"], pol["notice"]
    problems, recs = [], []
    if duration > mx:
        problems.append(f"Duration ({_days(duration)}) exceeds maximum consecutive days allowed ({_days(mx)}) "
                        f"for {human}")
        recs.append(f"Split into two requests: {_days(mx)} + {_days(duration - mx)}")
        if leave_type == "sick_leave":
            recs += ["Provide medical certificate for extended sick leave", "Consider extended medical leave policy"]
    if duration > balance:
        problems.append(f"Insufficient balance: requested {_days(duration)} but only {_days(balance)} available")
        recs.append(f"Reduce the request to {_days(balance)} or fewer" if balance > 0
                    else "Consider unpaid leave or wait for the balance to accrue")
    if notice < min_notice:
        problems.append(f"Notice ({_days(notice)}) is shorter than the required {_days(min_notice)} for {human}")
        recs.append(f"Submit the request at least {_days(min_notice)} in advance")
    if problems:
        return {"eligible": False, "reason": "; ".join(problems), "required_approvers": [], "recommendations": recs}
    notice_part = (f"notice ({_days(notice)}) meets the minimum ({_days(min_notice)})" if min_notice
                   else "no advance notice is required for sick leave")
    reason = (f"Duration ({_days(duration)}) is within max consecutive days ({mx}), balance is sufficient "
              f"({_days(balance)}) and {notice_part}")
    if leave_type == "casual_leave":
        recs = ["Ensure 1 day advance notice", "Complete handover before leave"]
    elif leave_type == "sick_leave":
        recs = (["Provide medical certificate"] if duration > 2 else []) + ["Inform your team of your absence"]
    else:
        recs = ["Complete handover before leave", "Set an out-of-office reply"]
    return {"eligible": True, "reason": reason, "required_approvers": list(pol["approvers"]), "recommendations": recs}


def hr_leave_row(rng: random.Random, with_pii: bool, name: str | None = None) -> tuple[str, dict, list[str]]:
    leave_type = pick(rng, _LEAVE_TYPES)
    pol = HR_POLICY[leave_type]
    mx = pol["max"]
    # Durations and notice cluster around the limits so boundary cases (exactly max, exactly balance) are common.
    duration = rng.randrange(1, mx + 1) if rng.random() < 0.7 else rng.randrange(mx + 1, mx + 6)
    balance = rng.randrange(0, pol["quota"] + 1)
    if rng.random() < 0.5:
        balance = max(balance, duration)
    if rng.random() < 0.8:
        notice = rng.randrange(pol["notice"], pol["notice"] + 15)
    else:
        notice = rng.randrange(0, pol["notice"] + 1)
    name = name or f"{pick(rng, _HR_FIRST)} {pick(rng, _HR_LAST)}"
    lines = [f"Employee: {name}"]
    if rng.random() < 0.4:
        lines.append(f"Department: {pick(rng, _HR_DEPTS)}")
    pii: list[str] = []
    if with_pii:
        r = rng.random()
        if r < 0.3:
            v, field = pii_email(rng), "Contact"
        elif r < 0.55:
            v, field = (pii_phone_es(rng) if rng.random() < 0.5 else pii_phone_us(rng)), "Phone"
        elif r < 0.75:
            v, field = pii_iban(rng), "Payroll IBAN"
        elif r < 0.9:
            v, field = pii_ssn(rng), "SSN"
        else:
            v, field = pii_dni(rng), "DNI"
        lines.append(f"{field}: {v}")
        pii.append(v)
    lines += [f"Type: {leave_type}", f"Duration: {_days(duration)}", f"Balance: {_days(balance)}",
              f"Notice: {_days(notice)}", f"Policy max: {_days(mx)}", f"Min notice: {_days(pol['notice'])}"]
    if rng.random() < 0.5:
        lines.append(f"Reason: {pick(rng, _HR_REASONS[leave_type])}")
    return "\n".join(lines), hr_decision(leave_type, duration, balance, notice), pii


def hr_leave_wrong(rng: random.Random, label: dict) -> dict:
    if label["eligible"]:
        if "hr" in label["required_approvers"] and rng.random() < 0.4:
            # Plausible slip: forgot the second approver for annual leave.
            return dict(label, required_approvers=["manager"])
        return {"eligible": False, "reason": "Request exceeds the policy limits for this leave type",
                "required_approvers": [], "recommendations": ["Reduce duration"]}
    return {"eligible": True, "reason": "Request complies with policy. Duration within limits.",
            "required_approvers": ["manager"], "recommendations": ["Ensure advance notice", "Complete handover"]}
