"""Synthetic email_intel traffic: B2B e-mails (subject + body) whose intent, urgency, entities and actions follow from
the template that wrote them."""

from __future__ import annotations

import random
from typing import Any

from retrain.data.synthetic.pii import digits, pick, pii_card, pii_email, pii_iban, pii_phone_es, pii_phone_us

# --- email_intel -------------------------------------------------------------------------------------
_COMPANIES = ("Acme Corp", "Globex", "Initech", "Umbrella IT", "Stark Retail", "Wayne Tech", "Hooli",
              "Vandelay Industries", "Contoso", "Fabrikam", "Northwind Traders", "Tailspin Toys", "Blue Yonder IT",
              "Iberia Sistemas", "Soluciones Norte")
_SKU_PREFIXES = ("XHU", "KTR", "MSF", "DLL", "HPE", "LNV", "CSC", "APL", "SMS", "LGE")
_SIGN_NAMES = ("Ana", "María", "Javier", "Pablo", "John", "Emily", "Michael", "Sarah", "David", "Laura", "Carlos",
               "Elena", "James", "Olivia", "Raúl", "Marta", "Kevin", "Priya")
_EMAIL_INTENTS = ("purchase_order",) * 5 + ("quote_request",) * 4 + ("support_ticket",) * 3 + \
                 ("ship_notice",) * 3 + ("invoice_query",) * 2 + ("return_request",) * 2
_ACTION_ORDER = ("validate_po", "apply_spa", "process_order", "prepare_quote", "check_inventory", "open_ticket",
                 "escalate", "update_tracking", "notify_customer", "review_invoice", "issue_rma")
_ACTION_RANK = {a: i for i, a in enumerate(_ACTION_ORDER)}
_URGENCIES = ("low", "low", "low", "medium", "medium", "high", "high")
_URG_SUBJECT = (" - URGENT", " [URGENT]", " - ASAP")
_URG_BODY = {
    "high": ("This is urgent, we need it today.", "URGENT: customer line down.",
             "Please treat as critical and reply ASAP."),
    "medium": ("Please handle this week.", "We need an answer by Friday.", "Please reply by end of week."),
    "low": ("", "", "No rush on this one.", "Whenever you get a chance."),
}
_GREETINGS = ("Hi team,", "Hello,", "Good morning,", "Hi,", "Dear sales team,", "Hola equipo,")
_CLOSINGS = ("Thanks,", "Regards,", "Best,", "Thank you,", "Saludos,")
_STOCK_CLAUSES = ("Please confirm stock availability before shipping.", "Can you check inventory first?",
                  "Let us know the lead time and stock availability.")
_EMAIL_ESCALATE = {"support_ticket", "invoice_query", "return_request"}


def _email_qty_phrase(rng: random.Random, qty: int, product: str) -> str:
    return pick(rng, ("{q} units of {p}", "{q} x {p}", "{q} pcs of {p}", "qty {q} of {p}")).format(q=qty, p=product)


def email_intel_row(rng: random.Random, with_pii: bool) -> tuple[str, dict, list[str]]:
    intent = pick(rng, _EMAIL_INTENTS)
    urgency = pick(rng, _URGENCIES)
    company = pick(rng, _COMPANIES)
    po = digits(rng, rng.randrange(6, 11))
    product = f"{pick(rng, _SKU_PREFIXES)}-{rng.randrange(100000):05d}"
    qty = pick(rng, (2, 5, 10, 12, 20, 24, 25, 40, 50, 75, 100, 150, 200, 250, 500, 1000)) \
        if rng.random() < 0.7 else rng.randrange(2, 999)
    spa = f"CAS-{rng.randrange(1000000):06d}-" + "".join(
        pick(rng, "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(6))
    ent: dict[str, Any] = {}
    actions: list[str] = []
    body: list[str] = []

    if intent == "purchase_order":
        edi = rng.random() < 0.3
        subject = (f"EDI CUST850 - PO {po}" if edi else
                   pick(rng, ("PO {po}", "Purchase Order {po} - {c}", "New order {po}", "Order PO# {po}"))
                   .format(po=po, c=company))
        body.append(pick(rng, ("Please process attached purchase order for {x}.",
                                "Attached is PO {po} for {x}.", "Kindly book PO {po}: {x}."))
                    .format(po=po, x=_email_qty_phrase(rng, qty, product)))
        ent.update(po_number=po, product=product, quantity=qty)
        actions += ["validate_po", "process_order"]
        if rng.random() < 0.4:
            body.append(pick(rng, ("Apply SPA {s}.", "Pricing per SPA {s}.", "Use special pricing {s}."))
                        .format(s=spa))
            ent["spa_code"] = spa
            actions.append("apply_spa")
        if edi:
            body.append("The CUST850 was also sent through EDI.")
            ent["edi"] = "CUST850"
        if rng.random() < 0.3:
            body.append(pick(rng, _STOCK_CLAUSES))
            actions.append("check_inventory")
    elif intent == "quote_request":
        subject = pick(rng, ("Quote request - {p}", "RFQ: {q} x {p}", "Pricing for {p}", "Quote-FTQ {c}")) \
            .format(p=product, q=qty, c=company)
        body.append(pick(rng, ("Could you send a quote for {x}?", "We would like pricing for {x}.",
                                "Please quote {x} for {c}.")).format(x=_email_qty_phrase(rng, qty, product), c=company))
        ent.update(product=product, quantity=qty)
        actions.append("prepare_quote")
        if rng.random() < 0.35:
            body.append(pick(rng, ("Please quote under SPA {s}.", "We have SPA {s} for this deal.")).format(s=spa))
            ent["spa_code"] = spa
            actions.append("apply_spa")
        if rng.random() < 0.35:
            body.append(pick(rng, _STOCK_CLAUSES))
            actions.append("check_inventory")
    elif intent == "support_ticket":
        variant = rng.random()
        if variant < 0.25:
            subject = f"CDW855 acknowledgment missing for PO {po}"
            body.append(f"We never received the CDW855 PO acknowledgment for PO {po}. Can you open a case?")
            ent.update(po_number=po, edi="CDW855")
        elif variant < 0.65:
            subject = pick(rng, ("Issue with {p}", "Problem: {p} not working", "Defective unit {p}")).format(p=product)
            body.append(pick(rng, ("The {p} we received keeps rebooting.", "Our {p} fails the firmware update.",
                                    "{p} shows a power fault on startup.")).format(p=product))
            ent["product"] = product
        else:
            subject = pick(rng, ("Support needed - order {po}", "Help with order {po}")).format(po=po)
            body.append(pick(rng, ("Units from PO {po} ({p}) are failing on boot.",
                                    "Devices delivered on PO {po} ({p}) will not power on.")).format(po=po, p=product))
            ent.update(po_number=po, product=product)
        actions.append("open_ticket")
    elif intent == "ship_notice":
        edi = rng.random() < 0.5
        subject = (f"CDW856 ASN for PO {po}" if edi else
                   pick(rng, ("Ship notice PO {po}", "Shipment update - {po}", "Order {po} shipped")).format(po=po))
        ent["po_number"] = po
        if rng.random() < 0.6:
            body.append(f"Please be advised PO {po} has shipped: {_email_qty_phrase(rng, qty, product)}.")
            ent.update(product=product, quantity=qty)
        else:
            body.append(f"PO {po} left our warehouse this morning.")
        if edi:
            body.append("EDI CDW856 advance ship notice transmitted.")
            ent["edi"] = "CDW856"
        body.append("Carrier tracking is available in the portal.")
        actions += ["update_tracking", "notify_customer"]
    elif intent == "invoice_query":
        edi = rng.random() < 0.3
        subject = (f"CUST810 invoice for PO {po}" if edi else
                   pick(rng, ("Invoice question - PO {po}", "Billing discrepancy on PO {po}")).format(po=po))
        ent["po_number"] = po
        if rng.random() < 0.5:
            body.append(f"The invoice for PO {po} does not reflect the pricing agreed in SPA {spa}.")
            ent["spa_code"] = spa
        else:
            body.append(pick(rng, ("The invoice for PO {po} was charged twice.",
                                    "We were billed freight on PO {po} although it was waived.")).format(po=po))
        if edi:
            body.append("The CUST810 came through EDI yesterday.")
            ent["edi"] = "CUST810"
        actions.append("review_invoice")
    else:  # return_request
        subject = pick(rng, ("RMA request - PO {po}", "Return {q} units of {p}", "Damaged goods on PO {po}")) \
            .format(po=po, q=qty, p=product)
        body.append(pick(rng, ("We need to return {x} from PO {po}; the boxes arrived damaged.",
                                "Please issue an RMA for {x} on PO {po}, wrong model shipped."))
                    .format(x=_email_qty_phrase(rng, qty, product), po=po))
        ent.update(po_number=po, product=product, quantity=qty)
        actions += ["issue_rma", "notify_customer"]

    if urgency == "high":
        r = rng.random()
        if r < 0.6:
            subject += pick(rng, _URG_SUBJECT)
        if r >= 0.35:
            body.append(pick(rng, _URG_BODY["high"]))
        if intent in _EMAIL_ESCALATE:
            actions.append("escalate")
    else:
        cue = pick(rng, _URG_BODY[urgency])
        if cue:
            body.append(cue)

    name = pick(rng, _SIGN_NAMES)
    signature = f"{pick(rng, _CLOSINGS)}\n{name}" + (f"\n{company}" if rng.random() < 0.5 else "")
    pii: list[str] = []
    if with_pii:
        r = rng.random()
        if r < 0.35:
            v = pii_email(rng)
            signature += f"\n{v}"
        elif r < 0.5:
            v = f"sales{rng.randrange(1000, 9999)}@tdsynnex.com"  # team routing addresses (seed 000)
            body.append(f"cc {v}")
        elif r < 0.75:
            v = pii_phone_es(rng) if rng.random() < 0.4 else pii_phone_us(rng)
            signature += f"\n{pick(rng, ('Tel: ', 'Mobile: ', 'Direct: '))}{v}"
        elif r < 0.9:
            v = pii_iban(rng)
            body.append(f"Refunds to our account IBAN {v}.")
        else:
            v = pii_card(rng)
            body.append(f"Charge the card on file {v}.")
        pii.append(v)
    text = f"Subject: {subject}\nBody: {pick(rng, _GREETINGS)}\n{' '.join(body)}\n{signature}"
    actions.sort(key=_ACTION_RANK.__getitem__)
    label = {"intent": intent, "entities": ent, "actions": actions, "urgency": urgency}
    return text, label, pii


_EMAIL_CONFUSIONS = {"purchase_order": ("quote_request", "ship_notice"), "quote_request": ("purchase_order",),
                     "support_ticket": ("return_request", "invoice_query"), "ship_notice": ("purchase_order",),
                     "invoice_query": ("support_ticket",), "return_request": ("support_ticket",)}


def email_intel_wrong(rng: random.Random, label: dict) -> dict:
    wrong = {"intent": label["intent"], "entities": dict(label["entities"]), "actions": list(label["actions"]),
             "urgency": label["urgency"]}
    r = rng.random()
    if r < 0.5:
        wrong["intent"] = pick(rng, _EMAIL_CONFUSIONS[label["intent"]])
    elif r < 0.8 or len(wrong["entities"]) < 2:
        wrong["urgency"] = pick(rng, tuple(u for u in ("low", "medium", "high") if u != label["urgency"]))
    else:
        wrong["entities"].pop(pick(rng, tuple(wrong["entities"])))  # missed an entity
    return wrong
