"""Generate the real-model demo's data set (data/demo/): shop messages -> one JSON order record.

    python scripts/make_demo_data.py [--out data/demo] [--train 160] [--validation 40] [--seed 7]

The task needs generalisation, not recall: every validation message uses customer names, cities and
products that never occur in training, and a third of the validation messages are phrased in ways no
training message is. The model must copy the right spans, turn the quantity into a number and write the
record in a fixed key order, which SmolLM2-135M-Instruct does not do out of the box.
Deterministic for a given seed; the shipped files were made with the defaults.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FIRST = ["Maria", "John", "Aisha", "Kenji", "Olga", "Pedro", "Fatima", "Liam", "Chloe", "Rahul", "Sofia",
         "Omar", "Emma", "Lucas", "Nina", "Ivan", "Grace", "Mateo", "Hana", "Victor", "Zara", "Felix", "Leila",
         "Tomas", "Ingrid", "Diego", "Amara", "Noah", "Yuki", "Elena"]
LAST = ["Lopez", "Smith", "Khan", "Tanaka", "Petrova", "Silva", "Haddad", "Murphy", "Martin", "Gupta", "Rossi",
        "Farouk", "Becker", "Moreau", "Novak", "Ivanov", "Okafor", "Garcia", "Kim", "Hugo", "Ali", "Weber",
        "Nasser", "Horvat", "Larsen", "Ramos", "Mensah", "Brown", "Sato", "Costa"]
VAL_FIRST = ["Beatrix", "Cyrus", "Dalia", "Evander", "Freya", "Gideon", "Imogen", "Jasper", "Kalinda", "Lorcan"]
VAL_LAST = ["Abernathy", "Quintero", "Vasquez", "Lindqvist", "Oyelaran", "Castellanos", "Whitfield", "Zielinski",
            "Achterberg", "Montague"]

CITIES = ["Lisbon", "Denver", "Osaka", "Nairobi", "Krakow", "Lyon", "Austin", "Porto", "Dublin", "Seville",
          "Munich", "Cairo", "Hanoi", "Quito", "Perth", "Oslo", "Leeds", "Turin", "Boston", "Lima"]
VAL_CITIES = ["Valparaiso", "Gothenburg", "Eindhoven", "Winnipeg", "Trondheim", "Cartagena", "Ljubljana",
              "Brisbane", "Salzburg", "Tbilisi"]

ITEMS = ["desk lamps", "coffee mugs", "yoga mats", "phone chargers", "wool scarves", "garden hoses",
         "water bottles", "notebooks", "bike helmets", "tea kettles", "picture frames", "rain jackets",
         "cutting boards", "board games", "travel pillows", "soup bowls", "hiking boots", "door mats",
         "table clocks", "paint brushes"]
VAL_ITEMS = ["ceramic vases", "camping stoves", "leather wallets", "bamboo blinds", "snow shovels",
             "glass teapots", "wall shelves", "fishing rods", "linen napkins", "copper pans"]

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                9: "nine", 10: "ten", 11: "eleven", 12: "twelve"}

TEMPLATES = [
    "Hi, this is {name} from {city}. I would like {qty} {item}, please.",
    "Please ship {qty} {item} to {name} in {city}.",
    "{name} here. Send {qty} {item} to my address in {city}.",
    "Order for {name}, {city}: {qty} {item}.",
    "Could you deliver {qty} {item} to {city}? The order is for {name}.",
    "Hello! {name} would like to buy {qty} {item}. Delivery to {city}.",
    "I need {qty} {item} in {city} by next week. Thanks, {name}",
    "New order: {qty} {item} for {name} ({city}).",
    "My name is {name} and I live in {city}. Can I get {qty} {item}?",
    "Ship to {city}, attention {name}: {qty} {item}.",
    "{name} from {city} is ordering {qty} {item}.",
    "Good morning, I'm {name}. Please put {qty} {item} on a truck to {city}.",
]
VAL_TEMPLATES = [
    "We are out of {item} here in {city}; {name} asks for {qty} more.",
    "Reserve {qty} {item} for pickup in {city}, name on the order: {name}.",
    "Dear shop, {name} needs {qty} {item} sent over to {city}. Regards.",
]


def make(n: int, firsts, lasts, cities, items, templates, rng: random.Random) -> list[dict]:
    rows, seen = [], set()
    while len(rows) < n:
        name = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        city, item, qty = rng.choice(cities), rng.choice(items), rng.randint(1, 12)
        template = rng.choice(templates)
        if (name, city, item, qty, template) in seen:
            continue
        seen.add((name, city, item, qty, template))
        # Small quantities are often written as words: the model has to turn them into a number.
        written = NUMBER_WORDS[qty] if rng.random() < 0.5 else str(qty)
        text = template.format(name=name, city=city, item=item, qty=written)
        target = json.dumps({"name": name, "item": item, "quantity": qty, "city": city})
        rows.append({"text": text, "target": target})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/demo")
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--validation", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    train = make(args.train, FIRST, LAST, CITIES, ITEMS, TEMPLATES, rng)
    n_new_wording = args.validation // 3
    val = make(args.validation - n_new_wording, VAL_FIRST, VAL_LAST, VAL_CITIES, VAL_ITEMS, TEMPLATES, rng)
    val += make(n_new_wording, VAL_FIRST, VAL_LAST, VAL_CITIES, VAL_ITEMS, VAL_TEMPLATES, rng)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.json", train), ("validation.json", val)):
        (out / name).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(train)} training and {len(val)} validation messages to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
