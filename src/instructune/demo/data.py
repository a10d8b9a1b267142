"""The built-in demo suite: five small instruction-tuning tasks generated from grammars and word pools.

Deterministic, offline and pure Python: every task and split has its own `random.Random(f"{seed}-{task}-{split}")`.
The test split draws people, companies, cities, products and services from held-out pools (disjoint from the
train/validation pools), so memorising names does not help, and no record's text occurs in two splits.
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from pathlib import Path

from ..errors import InstructuneError
from ..io import atomic_write

TASKS = ("support_tickets", "incident_summaries", "en_fr_translation", "company_qa", "news_ner")
SIZES = {"train": 120, "validation": 20, "test": 40}
LABELS = ("billing", "delivery", "technical", "account")

# --- name pools: train/validation, then the held-out pool used only by the test split ------------------------
FIRST_NAMES = ("Maria", "James", "Aisha", "Daniel", "Priya", "Lucas", "Elena", "Omar", "Sofia", "Kenji",
               "Grace", "Mateo", "Fatima", "Noah", "Ingrid", "Samuel", "Mei", "Tomas", "Chloe", "Ravi")
FIRST_NAMES_HELD_OUT = ("Yusuf", "Astrid", "Diego", "Hana", "Felix", "Amara", "Leon", "Zara", "Viktor", "Nadia")
LAST_NAMES = ("Lopez", "Okafor", "Lindqvist", "Tanaka", "Moreau", "Patel", "Novak", "Schmidt", "Haddad",
              "Kowalski", "Fischer", "Mensah", "Rossi", "Andersen", "Silva", "Nakamura", "O'Brien", "Dubois")
LAST_NAMES_HELD_OUT = ("Bergström", "Adeyemi", "Castillo", "Varga", "Yamamoto", "Lefèvre", "Osei", "Marchetti")
COMPANY_WORDS = ("Bluefin", "Northwind", "Copperleaf", "Redwood", "Silverline", "Brightwater", "Ironbark",
                 "Sunpeak", "Greenfield", "Oakmont", "Stonebridge", "Clearpath", "Maplewood", "Lumen", "Vantage")
COMPANY_WORDS_HELD_OUT = ("Driftwood", "Amberly", "Quillfield", "Westmark", "Falconridge", "Tidewater", "Larkspur")
COMPANY_SUFFIXES = ("Labs", "Systems", "Technologies", "Industries", "Group", "Works", "Solutions")
INSTITUTION_SUFFIXES = ("Bank", "University", "Airlines", "Motors", "Media", "Insurance")
CLUB_SUFFIXES = ("Rovers", "United", "Athletic", "Wanderers")
CITIES = ("Lisbon", "Oslo", "Nairobi", "Toronto", "Osaka", "Porto", "Denver", "Krakow", "Seville", "Melbourne",
          "Chennai", "Bogotá", "Cairo", "Hamburg", "Dublin", "Valencia", "Austin", "Manila", "Accra", "Tallinn")
CITIES_HELD_OUT = ("Rotterdam", "Montevideo", "Kyoto", "Bergen", "Lagos", "Tucson", "Gdansk", "Adelaide", "Lima")
BRANDS = ("Nimbus", "Aero", "Pixel", "Zenith", "Orbit", "Vela", "Kappa", "Solis")
BRANDS_HELD_OUT = ("Quasar", "Marlow", "Tundra", "Echo")
PRODUCT_KINDS = ("headphones", "blender", "smart speaker", "robot vacuum", "fitness tracker", "coffee machine",
                 "e-reader", "air purifier", "webcam", "electric toothbrush", "router", "drone")
SERVICES = (("checkout service", "complete a purchase"), ("payments API", "pay for their orders"),
            ("login service", "sign in"), ("search cluster", "search the catalogue"),
            ("email gateway", "receive confirmation emails"), ("mobile API", "use the mobile app"),
            ("order database", "place orders"), ("image CDN", "load product images"))
SERVICES_HELD_OUT = (("billing service", "download invoices"), ("inventory service", "see stock levels"),
                     ("notification queue", "get delivery alerts"), ("recommendation engine", "see suggestions"))
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")


class _Names:
    """Draws names for one split: held-out pools for the test split, the shared pools otherwise."""

    def __init__(self, rng: random.Random, held_out: bool):
        self.rng, self.held_out = rng, held_out
        self.firsts = FIRST_NAMES_HELD_OUT if held_out else FIRST_NAMES
        self.lasts = LAST_NAMES_HELD_OUT if held_out else LAST_NAMES
        self.words = COMPANY_WORDS_HELD_OUT if held_out else COMPANY_WORDS
        self.city_pool = CITIES_HELD_OUT if held_out else CITIES
        self.brands = BRANDS_HELD_OUT if held_out else BRANDS
        self.services = SERVICES_HELD_OUT if held_out else SERVICES

    def person(self) -> str:
        return f"{self.rng.choice(self.firsts)} {self.rng.choice(self.lasts)}"

    def org(self, suffixes=COMPANY_SUFFIXES) -> str:
        return f"{self.rng.choice(self.words)} {self.rng.choice(suffixes)}"

    def city(self) -> str:
        return self.rng.choice(self.city_pool)

    def product(self) -> str:
        model = self.rng.choice(("X2", "300", "Pro", "Mini", "S", "Max", "Air", "700"))
        return f"{self.rng.choice(self.brands)} {model} {self.rng.choice(PRODUCT_KINDS)}"

    def distinct(self, draw, k: int) -> list[str]:
        out: list[str] = []
        while len(out) < k:
            value = draw()
            if value not in out and not any(value in o or o in value for o in out):
                out.append(value)
        return out


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


# --- support_tickets (classification) ----------------------------------------------------------------------
TICKETS = {
    "billing": (
        "I was charged twice for order {order}, {amount} each time.",
        "My card statement shows a payment of {amount} for a {plan} plan I cancelled last month.",
        "The invoice for order {order} says {amount}, but the checkout page showed a lower price.",
        "I sent the {product} back and the courier confirmed pickup, but the refund of {amount} still hasn't reached my card.",
        "The discount code wasn't applied, so I paid {amount} for the {product} instead of the sale price.",
        "Why was I billed {amount} for shipping on order {order}? The site said delivery was free.",
        "I need a VAT invoice with my company name for order {order}. The one I got only shows my personal details.",
        "My subscription renewed at {amount} even though I switched to the free plan on {date}.",
        "You took {amount} from my account but order {order} still shows as unpaid.",
    ),
    "delivery": (
        "Order {order} was supposed to arrive on {weekday} and it's still not here.",
        "The tracking for order {order} has said 'out for delivery' for {days} days now.",
        "The {product} came today but the box was crushed and the side of it is dented.",
        "The driver left my parcel at the wrong address. The photo in the app shows a door that isn't mine.",
        "I only received part of order {order}; the {product} is missing from the box.",
        "My {product} still hasn't shown up after {days} days. If it isn't here by {weekday} I want a refund instead.",
        "Can I change the delivery address for order {order}? I've moved since I placed it.",
        "Order {order} was marked as delivered on {date}, but nothing arrived and my neighbours haven't seen it.",
        "I paid extra for express shipping but the {product} took {days} days to get here.",
    ),
    "technical": (
        "My {product} won't turn on any more, even after charging it overnight.",
        "The app crashes every time I try to pair it with my {product}.",
        "Since the last firmware update the {product} keeps dropping its Wi-Fi connection.",
        "I get error {error} whenever I try to sync the {product} with my phone.",
        "The {product} makes a loud clicking noise and then switches itself off.",
        "The {product} from order {order} arrived on time, but the screen stays black when I plug it in.",
        "The buttons on my {product} stopped responding after {days} days of use.",
        "The companion app shows my {product} as offline even though it's right next to the router.",
        "After I log in to the app, the settings page for the {product} just keeps loading forever.",
    ),
    "account": (
        "I can't log in because the password reset email never arrives.",
        "Please change the email address on my profile to {email}.",
        "Someone changed my password last night and now I'm locked out.",
        "How do I close my account and have all my personal data deleted?",
        "My two-factor codes stopped working after I got a new phone, so I can't sign in.",
        "I accidentally created two accounts and my orders are split between them. Can you merge them?",
        "I can't see my past invoices because my account says it has been suspended.",
        "Please update the name on my account to {name}; I changed it after getting married.",
        "The verification link you sent expired before I clicked it, so my new account was never activated.",
    ),
}
OPENINGS = ("", "", "", "Hi,", "Hello,", "Hi there,", "Good morning,", "Hey,", "Dear support team,",
            "To whom it may concern,", "Quick question:", "Hello again,", "Hi, this is {first}.", "Urgent:")
CLOSINGS = ("", "", "", "Thanks.", "Thanks in advance!", "Please help.", "Can someone look into this today?",
            "This is really frustrating.", "I've already written to you twice about this.", "Any help appreciated.",
            "Please get back to me as soon as possible.", "Cheers, {first}", "Regards, {name}", "What should I do?")
PLANS = ("Premium", "Family", "Pro", "yearly", "monthly")


def _ticket(rng: random.Random, names: _Names, i: int) -> dict:
    label = LABELS[i % len(LABELS)]
    first, last = rng.choice(names.firsts), rng.choice(names.lasts)
    ascii_last = unicodedata.normalize("NFKD", last).encode("ascii", "ignore").decode().replace("'", "").lower()
    order = rng.choice(("#{}", "{}", "ORD-{}", "#A-{}")).format(rng.randint(10000, 99999))
    slots = {
        "first": first, "name": f"{first} {last}", "email": f"{first.lower()}.{ascii_last}@example.com",
        "product": names.product(), "order": order, "days": rng.randint(3, 21), "weekday": rng.choice(DAYS),
        "amount": f"{rng.choice('$€£')}{rng.randint(5, 400)}.{rng.choice(('00', '99', '50', '49'))}",
        "date": f"{rng.choice(MONTHS)} {rng.randint(1, 28)}", "error": f"E{rng.randint(100, 999)}",
        "plan": rng.choice(PLANS),
    }
    opening, body = rng.choice(OPENINGS), rng.choice(TICKETS[label])
    if opening.endswith(",") and not body.startswith("I "):  # "Hi, my order ..."
        body = body[0].lower() + body[1:]
    text = " ".join(p for p in (opening, body, rng.choice(CLOSINGS)) if p).format(**slots)
    if rng.random() < 0.1:  # some people type everything in lower case
        text = text.lower()
    return {"text": text, "label": label}


# --- incident_summaries (summarization) ----------------------------------------------------------------------
# state: (summary phrase, ways the report describes it)
STATES = (
    ("was down", ("went down", "stopped responding", "became unreachable", "returned 503 errors for every request")),
    ("was slow", ("slowed to a crawl", "responded with p99 latency above {secs} seconds", "became very slow")),
    ("returned errors", ("started failing about {pct}% of requests", "returned intermittent 500 errors")),
)
# cause for the summary, detail added in the report, fixes as (gerund for the summary, past tense for the report)
CAUSES = (
    ("a bad config push", "to the load balancers",
     (("rolling back", "rolled the change back"), ("reverting the push", "reverted the push"))),
    ("an expired TLS certificate", "on the public gateway", (("renewing the certificate", "renewed the certificate"),)),
    ("a full disk", "on the primary database",
     (("freeing space", "freed up disk space"), ("adding storage", "added storage"))),
    ("a memory leak", "in the latest release",
     (("rolling back", "rolled back the release"), ("restarting the pods", "restarted the pods"))),
    ("a failed network switch", "in the {city} data centre", (("failing over", "failed over to a backup switch"),)),
    ("a runaway batch job", "that saturated the database", (("killing the job", "killed the job"),)),
    ("a DNS misconfiguration", "introduced during routine maintenance",
     (("reverting the records", "reverted the DNS records"),)),
    ("connection pool exhaustion", "on the API servers", (("raising its limit", "raised the pool limit"),)),
    ("a traffic spike", "from a marketing campaign",
     (("adding servers", "added servers"), ("scaling out", "scaled out the cluster"))),
)
OPEN_SENTENCES = (
    "At {time} UTC on {day}, the {service} {symptom}.",
    "On {day} at {time} UTC, monitoring showed that the {service} {symptom}.",
    "The on-call engineer, {person}, was paged at {time} UTC on {day} when the {service} {symptom}.",
    "Incident report for {day}: starting at {time} UTC, the {service} {symptom}.",
    "Shortly after {time} UTC on {day} the {service} {symptom}.",
    "Customers began reporting problems at {time} UTC on {day}, when the {service} {symptom}.",
)
CAUSE_SENTENCES = ("The root cause was {cause} {detail}.", "Engineers traced the problem to {cause} {detail}.",
                   "The investigation found {cause} {detail}.", "It was caused by {cause} {detail}.",
                   "{Cause} {detail} was to blame.")
FIX_SENTENCES = ("The team {fix}, and the service recovered after {minutes} minutes.",
                 "Once engineers {fix}, normal service returned; the incident lasted {minutes} minutes.",
                 "Service was fully restored {minutes} minutes after the first alert, once the team {fix}.",
                 "The incident lasted {minutes} minutes in total and ended when the team {fix}.",
                 "After {minutes} minutes the team {fix} and everything recovered.")
IMPACT_SENTENCES = ("About {users:,} customers could not {action}.", "Roughly {users:,} users were unable to {action}.",
                    "Support received {tickets} tickets from customers who could not {action}.",
                    "During that time around {users:,} people tried and failed to {action}.")
EXTRA_SENTENCES = ("No data was lost.", "A full post-mortem is planned for next week.",
                   "Only the {city} region was affected.", "{person} led the response.")


def _incident(rng: random.Random, names: _Names, i: int) -> dict:
    service, action = rng.choice(names.services)
    state, symptoms = rng.choice(STATES)
    cause, detail, fixes = rng.choice(CAUSES)
    fix_gerund, fix_past = rng.choice(fixes)
    slots = {"service": service, "action": action, "day": rng.choice(DAYS), "person": names.person(),
             "time": f"{rng.randint(0, 23):02d}:{rng.choice(range(0, 60, 5)):02d}", "city": names.city(),
             "minutes": rng.choice((8, 12, 15, 20, 25, 30, 35, 40, 45, 50, 55, 70, 90, 105, 120)),
             "secs": rng.randint(4, 30), "pct": rng.randint(5, 60), "users": rng.randint(2, 400) * 50,
             "tickets": rng.randint(12, 600), "fix": fix_past, "cause": cause, "Cause": _cap(cause)}
    slots["symptom"] = rng.choice(symptoms).format(**slots)
    slots["detail"] = detail.format(**slots)
    middle = [rng.choice(CAUSE_SENTENCES), rng.choice(FIX_SENTENCES)]
    if rng.random() < 0.7:
        middle.append(rng.choice(IMPACT_SENTENCES))
    rng.shuffle(middle)
    sentences = [rng.choice(OPEN_SENTENCES)] + middle
    if len(sentences) < 4 or rng.random() < 0.3:
        extra = rng.choice(EXTRA_SENTENCES)
        if not ("{person}" in extra and "{person}" in sentences[0]):
            sentences.append(extra)
    text = " ".join(s.format(**slots) for s in sentences)
    summary = f"The {service} {state} for {slots['minutes']} minutes on {slots['day']} after {cause}; {fix_gerund} fixed it."
    return {"text": text, "summary": summary}


# --- en_fr_translation: a small bilingual grammar ------------------------------------------------------------
# subjects: (English, French, person index 0-5 as je/tu/il/nous/vous/ils, gender for être agreement or None)
SUBJECTS = (("I", "je", 0, None), ("you", "vous", 4, None), ("he", "il", 2, "m"), ("she", "elle", 2, "f"),
            ("we", "nous", 3, "m"), ("they", "ils", 5, "m"), ("my sister", "ma sœur", 2, "f"),
            ("my brother", "mon frère", 2, "m"), ("my mother", "ma mère", 2, "f"), ("my uncle", "mon oncle", 2, "m"),
            ("the children", "les enfants", 5, "m"), ("the girls", "les filles", 5, "f"),
            ("our neighbours", "nos voisins", 5, "m"), ("my friends", "mes amis", 5, "m"))
FR_NAMES = (("Marie", "f"), ("Paul", "m"), ("Julie", "f"), ("Thomas", "m"), ("Claire", "f"), ("Hugo", "m"))
FR_NAMES_HELD_OUT = (("Léa", "f"), ("Antoine", "m"), ("Chloé", "f"), ("Nicolas", "m"))
# adjectives (all placed after the noun in French): English, then masc sg, fem sg, masc pl, fem pl
ADJECTIVES = {
    "red": ("rouge", "rouge", "rouges", "rouges"), "black": ("noir", "noire", "noirs", "noires"),
    "green": ("vert", "verte", "verts", "vertes"), "white": ("blanc", "blanche", "blancs", "blanches"),
    "blue": ("bleu", "bleue", "bleus", "bleues"), "heavy": ("lourd", "lourde", "lourds", "lourdes"),
    "expensive": ("cher", "chère", "chers", "chères"), "fresh": ("frais", "fraîche", "frais", "fraîches"),
    "ripe": ("mûr", "mûre", "mûrs", "mûres"), "broken": ("cassé", "cassée", "cassés", "cassées"),
    "delicious": ("délicieux", "délicieuse", "délicieux", "délicieuses"),
}
# nouns: English sg/pl, French sg/pl, gender, adjectives that fit, verbs that take it as object
NOUNS = (
    ("car", "cars", "voiture", "voitures", "f", "red black blue white expensive", "buy wash repair look like"),
    ("bike", "bikes", "vélo", "vélos", "m", "red black green blue expensive", "buy wash repair look like forget"),
    ("book", "books", "livre", "livres", "m", "red green blue heavy expensive", "buy carry find forget look order like"),
    ("bag", "bags", "sac", "sacs", "m", "red black green blue heavy", "buy carry find forget look order"),
    ("computer", "computers", "ordinateur", "ordinateurs", "m", "black white heavy expensive broken", "buy carry repair find order look"),
    ("clock", "clocks", "horloge", "horloges", "f", "white black broken", "buy repair find order look like"),
    ("chair", "chairs", "chaise", "chaises", "f", "red green white broken", "buy carry repair order"),
    ("table", "tables", "table", "tables", "f", "white black heavy", "buy carry wash repair order"),
    ("umbrella", "umbrellas", "parapluie", "parapluies", "m", "red black blue broken", "buy forget find look carry"),
    ("shirt", "shirts", "chemise", "chemises", "f", "white blue green", "buy wash look order like"),
    ("dress", "dresses", "robe", "robes", "f", "red black green blue expensive", "buy wash look order like"),
    ("coat", "coats", "manteau", "manteaux", "m", "black blue green heavy expensive", "buy wash forget look order like"),
    ("hat", "hats", "chapeau", "chapeaux", "m", "red black green white", "buy forget look order like find"),
    ("letter", "letters", "lettre", "lettres", "f", "", "find forget carry"),
    ("window", "windows", "fenêtre", "fenêtres", "f", "broken", "wash repair"),
    ("apple", "apples", "pomme", "pommes", "f", "red green ripe fresh", "buy eat like"),
    ("cake", "cakes", "gâteau", "gâteaux", "m", "delicious", "buy eat order like"),
    ("orange", "oranges", "orange", "oranges", "f", "ripe fresh", "buy eat"),
    ("tomato", "tomatoes", "tomate", "tomates", "f", "red green ripe fresh", "buy eat"),
    ("pizza", "pizzas", "pizza", "pizzas", "f", "delicious", "buy eat order like"),
)
# determiners: English sg/pl, French masc sg, fem sg, plural, then masc and fem sg before a vowel or mute h
# (le/la are left as they are there: `_elide` turns them into l')
DETERMINERS = {"the": ("the", "the", "le", "la", "les", "le", "la"), "a": ("a", "some", "un", "une", "des", "un", "une"),
               "my": ("my", "my", "mon", "ma", "mes", "mon", "mon"),
               "this": ("this", "these", "ce", "cette", "ces", "cet", "cette")}
PLACES = {"market": ("at the market", "au marché"), "shop": ("at the shop", "au magasin"),
          "town": ("in town", "en ville"), "kitchen": ("in the kitchen", "dans la cuisine"),
          "garden": ("in the garden", "dans le jardin"), "station": ("at the station", "à la gare"),
          "office": ("at the office", "au bureau"), "home": ("at home", "à la maison"),
          "school": ("at school", "à l'école"), "hotel": ("at the hotel", "à l'hôtel"),
          "airport": ("at the airport", "à l'aéroport"), "street": ("in the street", "dans la rue"),
          "to_office": ("to the office", "au bureau"), "to_school": ("to school", "à l'école"),
          "to_market": ("to the market", "au marché"), "to_station": ("to the station", "à la gare"),
          "to_kitchen": ("to the kitchen", "dans la cuisine")}
# verbs: key, English base/3sg/past, French present je..ils, past participle, auxiliary, tenses, places
VERBS = (
    ("buy", ("buy", "buys", "bought"), "achète achètes achète achetons achetez achètent",
     "acheté", "avoir", "pres past", "market shop town"),
    ("eat", ("eat", "eats", "ate"), "mange manges mange mangeons mangez mangent",
     "mangé", "avoir", "pres past", "kitchen garden"),
    ("wash", ("wash", "washes", "washed"), "lave laves lave lavons lavez lavent",
     "lavé", "avoir", "pres past", "garden kitchen"),
    ("find", ("find", "finds", "found"), "trouve trouves trouve trouvons trouvez trouvent",
     "trouvé", "avoir", "past", "kitchen garden station"),
    ("forget", ("forget", "forgets", "forgot"), "oublie oublies oublie oublions oubliez oublient",
     "oublié", "avoir", "pres past", "station office school"),
    ("carry", ("carry", "carries", "carried"), "porte portes porte portons portez portent",
     "porté", "avoir", "pres past", "to_kitchen to_office to_station"),
    ("repair", ("repair", "repairs", "repaired"), "répare répares répare réparons réparez réparent",
     "réparé", "avoir", "pres past", "garden kitchen"),
    ("order", ("order", "orders", "ordered"), "commande commandes commande commandons commandez commandent",
     "commandé", "avoir", "pres past", ""),
    ("look", ("look for", "looks for", "looked for"), "cherche cherches cherche cherchons cherchez cherchent",
     "cherché", "avoir", "pres past", "town station"),
    ("like", ("like", "likes", "liked"), "aime aimes aime aimons aimez aiment",
     "aimé", "avoir", "pres", ""),
    ("arrive", ("arrive", "arrives", "arrived"), "arrive arrives arrive arrivons arrivez arrivent",
     "arrivé", "être", "pres past", "station office school hotel airport"),
    ("stay", ("stay", "stays", "stayed"), "reste restes reste restons restez restent",
     "resté", "être", "pres past", "home garden hotel office"),
    ("fall", ("fall", "falls", "fell"), "tombe tombes tombe tombons tombez tombent",
     "tombé", "être", "past", "garden kitchen street station"),
    ("return", ("return", "returns", "returned"), "retourne retournes retourne retournons retournez retournent",
     "retourné", "être", "pres past", "to_office to_school to_market to_station"),
)
AUX = {"avoir": ("ai", "as", "a", "avons", "avez", "ont"), "être": ("suis", "es", "est", "sommes", "êtes", "sont")}
TIMES = {"pres": (("every morning", "chaque matin"), ("every day", "tous les jours"), ("on Sundays", "le dimanche"),
                  ("every evening", "tous les soirs"), ("every week", "chaque semaine"), ("on Mondays", "le lundi")),
         "past": (("yesterday", "hier"), ("last week", "la semaine dernière"), ("this morning", "ce matin"),
                  ("last night", "hier soir"), ("on Saturday", "samedi"), ("two days ago", "il y a deux jours"),
                  ("last month", "le mois dernier"))}
_VOWELS = tuple("aeiouhâàéèêîôû")


def _elide(words: list[str]) -> str:
    """Join French words, eliding je/ne/le/la before a vowel or mute h (every h-word in the grammar is mute)."""
    out: list[str] = []
    for w in words:
        if out and out[-1] in ("je", "ne", "le", "la") and w.lower().startswith(_VOWELS):
            out[-1] = out[-1][0] + "'" + w
        else:
            out.append(w)
    return " ".join(out)


def _noun_phrase(det: str, noun: str, adj: str | None = None, plural: bool = False) -> tuple[str, str]:
    """("the", "car", "black") -> ("the black car", "la voiture noire"); French adjectives follow the noun."""
    en_sg, en_pl, fr_sg, fr_pl, gender, *_ = next(n for n in NOUNS if n[0] == noun)
    en_det, en_det_pl, masc, fem, pl, masc_v, fem_v = DETERMINERS[det]
    en_words = ([en_det_pl] if plural else [en_det]) + ([adj] if adj else []) + [en_pl if plural else en_sg]
    if en_words[0] == "a" and en_words[1].startswith(tuple("aeiou")):
        en_words[0] = "an"
    fr_noun = fr_pl if plural else fr_sg
    if plural:
        fr_det = pl
    elif fr_noun.startswith(_VOWELS):
        fr_det = masc_v if gender == "m" else fem_v
    else:
        fr_det = masc if gender == "m" else fem
    fr_words = [fr_det, fr_noun]
    if adj:
        fr_words.append(ADJECTIVES[adj][(2 if plural else 0) + (1 if gender == "f" else 0)])
    return " ".join(en_words), _elide(fr_words)


def _sentence(subject: tuple, verb: str, tense: str, negated: bool = False, obj: tuple | None = None,
              place: str | None = None, time: tuple[str, str] | None = None) -> tuple[str, str]:
    """One English sentence and its French translation; `obj` is (determiner, noun, adjective, plural)."""
    en_subj, fr_subj, person, gender = subject
    _, (base, third, past), present, participle, aux, *_ = next(v for v in VERBS if v[0] == verb)
    present = present.split()
    if tense == "pres":
        en_verb = (("does not " if person == 2 else "do not ") + base) if negated else (third if person == 2 else base)
        fr_verb = [present[person]]
    else:
        en_verb = f"did not {base}" if negated else past
        if aux == "être":
            participle += ("e" if gender == "f" else "") + ("s" if person >= 3 else "")
        fr_verb = [AUX[aux][person], participle]
    if negated:
        fr_verb = ["ne", fr_verb[0], "pas"] + fr_verb[1:]
    en, fr = [en_subj, en_verb], [fr_subj] + fr_verb
    for part in (_noun_phrase(*obj) if obj else None, PLACES[place] if place else None, time):
        if part:
            en.append(part[0])
            fr.append(part[1])
    return _cap(" ".join(en)) + ".", _cap(_elide(fr)) + "."


def _translation(rng: random.Random, names: _Names, i: int) -> dict:
    while True:
        verb = rng.choice(VERBS)
        key, aux, tenses, places = verb[0], verb[4], verb[5].split(), verb[6].split()
        tense = rng.choice(tenses)
        negated = rng.random() < 0.2
        pool = FR_NAMES_HELD_OUT if names.held_out else FR_NAMES
        subjects = SUBJECTS + tuple((n, n, 2, g) for n, g in pool) * 2
        subject = rng.choice([s for s in subjects if aux == "avoir" or s[3]])
        obj = None
        if aux == "avoir":
            noun = rng.choice([n for n in NOUNS if key in n[6].split()])
            definite = negated or key == "like"  # "ne ... pas un/des" takes "de"; one likes "les pommes", not "des"
            det = rng.choice(("the", "my", "this") if definite else ("the", "the", "a", "my", "this"))
            adj = rng.choice(noun[5].split() + [None]) if noun[5] else None
            obj = (det, noun[0], adj, rng.random() < 0.35)
        place = rng.choice(places) if places and (aux == "être" or rng.random() < 0.4) else None
        time = rng.choice(TIMES[tense]) if key != "like" and rng.random() < 0.75 else None
        en, fr = _sentence(subject, key, tense, negated, obj, place, time)
        if 5 <= len(en.split()) <= 12:
            return {"text": en, "translation": fr}


# --- company_qa (extractive QA) --------------------------------------------------------------------------------
PRODUCTS = ("solar-powered water pumps", "accounting software for small farms", "electric cargo bikes",
            "noise-cancelling headphones", "modular office furniture", "plant-based cheese",
            "hospital scheduling software", "weather sensors for vineyards", "recycled plastic packaging",
            "language-learning apps", "industrial inspection drones", "smart thermostats", "children's board games")
FACT_SENTENCES = {
    "founding": ("{company} was founded in {year} by {founder}.", "{founder} started {company} in {year}.",
                 "{company} was set up by {founder} in {year}.", "In {year}, {founder} founded {company}."),
    "city": ("The company is headquartered in {city}.", "{company} is based in {city}.",
             "Its head office is in {city}, and it also runs a smaller office in {city2}.",
             "Although it opened its first office in {city2}, the company now has its headquarters in {city}."),
    "employees": ("It employs about {employees} people.", "Today the company has {employees} employees.",
                  "Its workforce numbers roughly {employees}.", "{company} has a staff of {employees}."),
    "product": ("{company} makes {product}.", "The company is best known for {product}.",
                "Its main product line is {product}.", "Most of its revenue comes from {product}."),
    "ceo": ("{ceo} has been chief executive since {year2}.", "The current CEO is {ceo}.",
            "Since {year2} the company has been run by {ceo}, its chief executive."),
    "ceo_founder": ("{founder} still runs the company as CEO.", "Its founder, {founder}, remains chief executive."),
    "distractor": ("The company went public in {year2}.", "It was bought by {buyer} in {year2}.",
                   "It moved into its current building in {year2}."),
}
QUESTIONS = {
    "year": ("When was {company} founded?", "In what year was {company} established?",
             "What year did {founder} start the company?", "When did {company} get started?"),
    "founder": ("Who founded {company}?", "Who started {company}?", "Who is the founder of {company}?",
                "Which person set up {company}?"),
    "city": ("Where is {company} headquartered?", "In which city is {company} based?",
             "Where is the head office of {company}?", "What city is the company's headquarters in?"),
    "employees": ("How many people work at {company}?", "How many employees does {company} have?",
                  "What is the size of {companys} workforce?"),
    "product": ("What does {company} make?", "What is {company} known for?", "What kind of products does {company} sell?"),
    "ceo": ("Who is the CEO of {company}?", "Who runs {company}?", "Who is {companys} chief executive?",
            "Who leads {company} today?"),
}


def _company(rng: random.Random, names: _Names, i: int) -> dict:
    company, buyer = names.distinct(names.org, 2)
    founder, other = names.distinct(names.person, 2)
    year = rng.randint(1950, 2015)
    employees = rng.choice((rng.randint(12, 95), rng.randint(1, 60) * 50, rng.randint(2, 40) * 500))
    city, city2 = names.distinct(names.city, 2)
    slots = {"company": company, "companys": company + ("'" if company.endswith("s") else "'s"), "buyer": buyer,
             "founder": founder, "year": year, "city": city, "city2": city2,
             "year2": rng.randint(year + 2, 2024), "employees": f"{employees:,}", "product": rng.choice(PRODUCTS),
             "ceo": founder if rng.random() < 0.2 else other}
    facts = rng.sample(("city", "employees", "product", "ceo"), rng.randint(2, 4))
    kinds = [f if f != "ceo" or slots["ceo"] != founder else "ceo_founder" for f in facts]
    if len(kinds) < 4 and "ceo" not in kinds and rng.random() < 0.5:
        kinds.append("distractor")
    rng.shuffle(kinds)
    kinds.insert(0, "founding")  # the opening sentence names the company
    context = " ".join(rng.choice(FACT_SENTENCES[k]) for k in kinds).format(**slots)
    asked = rng.choice(["year", "founder"] + facts)
    answer = str(slots[asked])
    assert answer in context, (answer, context)
    return {"context": context, "question": rng.choice(QUESTIONS[asked]).format(**slots), "answer": answer}


# --- news_ner ----------------------------------------------------------------------------------------------------
# slots: p = person, o = company, i = institution, c = club, l = location (numbered when a template has two)
NEWS = (
    "{p1}, chief executive of {o1}, said on {day} that the company would open a new office in {l1}.",
    "Shares of {o1} rose {pct}% on {day} after the company agreed to buy {o2}.",
    "Heavy rain forced officials in {l1} to close schools and suspend bus services on {day}.",
    "{p1} met {p2} in {l1} on {day} to discuss plans for a new rail link.",
    "The mayor of {l1}, {p1}, opened a new bridge over the river on {day}.",
    "{o1} will cut {n} jobs at its plant near {l1}, a spokesperson said.",
    "{p1} scored twice as {c1} beat {c2} 3-1 on {day}.",
    "Police in {l1} said no one was hurt when a fire broke out at a warehouse owned by {o1}.",
    "Talks between {i1} and the unions ended without agreement, {p1} told reporters in {l1}.",
    "{i1} has named {p1} as its new finance director. The appointment takes effect in {month}, when {p2} retires.",
    "Flights between {l1} and {l2} were cancelled on {day} because of strong winds.",
    "{p1} will lead the research centre that {o1} is building in {l1}.",
    "Thousands of runners took part in the annual city marathon in {l1} on {day}.",
    "{o1} reported a {pct}% rise in quarterly profit, beating analysts' forecasts.",
    "{p1} announced on {day} that {o1} would move its headquarters from {l1} to {l2}.",
    "{o1} and {i1} signed a deal on {day} to build a solar farm outside {l1}.",
    "Fans in {l1} celebrated late into the night after {c1} won the cup final. Coach {p1} called it the best night in the club's history.",
    "A spokesperson for {i1} said the outage affected customers in {l1} for about two hours.",
)
ENTITY_TYPES = {"p": "person", "o": "organization", "i": "organization", "c": "organization", "l": "location"}


def _news(rng: random.Random, names: _Names, i: int) -> dict:
    template = rng.choice(NEWS)
    draws = {"p": names.person, "o": names.org, "i": lambda: names.org(INSTITUTION_SUFFIXES),
             "c": lambda: names.org(CLUB_SUFFIXES), "l": names.city}
    slots, types = {}, {}  # entity text -> type; entities share no word, so each one's position is unambiguous
    for kind, draw in draws.items():
        for key in (f"{kind}1", f"{kind}2"):
            if "{" + key + "}" in template:
                value = draw()
                while set(value.split()) & {w for t in types for w in t.split()}:
                    value = draw()
                slots[key], types[value] = value, ENTITY_TYPES[kind]
    slots.update(day=rng.choice(DAYS), month=rng.choice(MONTHS), pct=rng.randint(2, 18), n=rng.randint(3, 60) * 10)
    text = template.format(**slots)
    return {"text": text, "entities": [{"text": e, "type": types[e]} for e in sorted(types, key=text.index)]}


# --- generation and writing ---------------------------------------------------------------------------------------
_MAKERS = {"support_tickets": _ticket, "incident_summaries": _incident, "en_fr_translation": _translation,
           "company_qa": _company, "news_ner": _news}


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold())


def _trigrams(words: list[str]) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + 3]) for i in range(len(words) - 2)} or {tuple(words)}


def generate(task: str, seed: int = 0) -> dict[str, list[dict]]:
    """The train/validation/test records of one demo task.

    No input text repeats (compared casefolded, without punctuation), and a validation or test input is never a
    near duplicate of a training one (80% or more of its word trigrams inside one training input)."""
    if task not in _MAKERS:
        raise ValueError(f"unknown demo task {task!r}; valid: {', '.join(TASKS)}")
    make, key = _MAKERS[task], "context" if task == "company_qa" else "text"
    seen: set[str] = set()
    train_grams: list[set] = []
    splits: dict[str, list[dict]] = {}
    for split, size in SIZES.items():
        rng = random.Random(f"{seed}-{task}-{split}")
        names = _Names(rng, held_out=split == "test")
        records: list[dict] = []
        for _ in range(size * 200):
            if len(records) == size:
                break
            record = make(rng, names, len(records))  # support tickets: the label cycles with len(records)
            words = _words(record[key])
            grams = _trigrams(words)
            if " ".join(words) in seen or any(len(grams & t) >= 0.8 * len(grams) for t in train_grams):
                continue
            seen.add(" ".join(words))
            records.append(record)
            if split == "train":
                train_grams.append(grams)
        if len(records) < size:
            raise RuntimeError(f"could not generate {size} distinct {task} records for {split}")
        rng.shuffle(records)
        splits[split] = records
    return splits


README = """# The demo data

Synthetic data for the built-in demo (`configs/demo.yaml`), generated by `src/instructune/demo/data.py` with
seed {seed}; `instructune demo-data` regenerates it exactly (same seed, same files). Nothing here was collected
from people or downloaded: every record comes from small hand-written grammars, sentence templates and word pools
in that file, sampled with Python's `random` (one generator per task and split).

| task | type | fields | train | validation | test |
| --- | --- | --- | --- | --- | --- |
| support_tickets | classification | text, label (billing / delivery / technical / account, balanced) | {train} | {validation} | {test} |
| incident_summaries | summarization | text (3-5 sentence incident report), summary (one sentence) | {train} | {validation} | {test} |
| en_fr_translation | translation | text (English), translation (French) | {train} | {validation} | {test} |
| company_qa | qa | context, question, answer (an exact span of the context) | {train} | {validation} | {test} |
| news_ner | ner | text, entities ([{{text, type}}], type person / organization / location) | {train} | {validation} | {test} |

- Each task has several templates (support messages with hard cases such as a refund asked for in a delivery
  complaint, report and summary phrasings, fact sentences and question wordings, news sentences), so copying one
  template does not solve it.
- The test split uses held-out pools of people, companies, cities, products and services that never occur in
  train or validation, so memorising names does not help. No input text appears twice (compared casefolded,
  without punctuation), and no validation or test input is a near duplicate of a training input (80% or more of
  its word trigrams inside one training input).
- The French grammar is deliberately small (a few regular verbs in the present and passé composé with avoir or
  être, postnominal adjectives, le/la/les, un/une/des, mon/ma/mes, ce/cet/cette/ces) so that it stays correct:
  articles, adjectives and past participles agree in gender and number, and je/ne/le/la elide before vowels.
"""


MARKER = ".instructune-demo"  # in every folder demo-data wrote: a rerun may rewrite it, nothing else is touched


def check_demo_folder(out: Path) -> Path:
    """Refuse a folder demo-data did not write (before the first byte): a file, or a folder holding anything but a
    demo suite (its marker, or only the task folders and this README, as written before the marker existed)."""
    if out.exists() and not out.is_dir():
        raise InstructuneError("exists and is not a folder", str(out))
    if out.is_dir() and not (out / MARKER).is_file():
        readme = out / "README.md"
        ours = not readme.exists() or (readme.is_file() and readme.read_text(errors="replace").startswith(README[:40]))
        other = sorted(p.name for p in out.iterdir() if p.name not in {*TASKS, "README.md"}) or ([] if ours else ["README.md"])
        if other:
            raise InstructuneError(f"this folder holds other files ({', '.join(other[:5])}) and was not made by "
                                   "`instructune demo-data`; choose an empty or new folder", str(out))
    return out


def write_demo_data(out_dir, seed: int = 0) -> list[Path]:
    """Write `<out_dir>/<task>/<split>.jsonl` for every task, plus a README; returns the paths written."""
    out, paths = check_demo_folder(Path(out_dir)), []
    atomic_write(out / MARKER, f"written by `instructune demo-data` (seed {seed}); it may rewrite this folder\n")
    for task in TASKS:
        for split, records in generate(task, seed).items():
            path = out / task / f"{split}.jsonl"
            atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            paths.append(path)
    readme = out / "README.md"
    atomic_write(readme, README.format(seed=seed, **SIZES))
    return paths + [readme]
