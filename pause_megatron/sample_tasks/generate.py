"""Writes the built-in task rows (<task>/train.jsonl and eval.jsonl, in each dataset's own row format).

    python -m pause_megatron.sample_tasks.generate [OUT]   # OUT defaults to this folder

Seeded, so the committed rows are what this writes. The rows are held out: train and eval share no prompt,
and their names, objects, places and (for HellaSwag and LAMBADA) contexts and sentence templates are drawn
from disjoint pools, so an eval score measures what finetuning taught, not recall. The multiple-choice rows
are built so that no surface feature gives the answer: every choice of a HellaSwag row starts with the
context's name and comes from the same split's pool of plausible endings, the two PIQA solutions of a pair
of opposite goals are the same two sentences, and the gold position is drawn at random
(tests/test_sample_tasks.py scores simple heuristics on them).
"""

from __future__ import annotations

import json
import os
import random
import sys

SEED = 1234
N_TRAIN, N_EVAL = 48, 32

COUNTRIES = [
    ("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Kenya", "Nairobi"), ("Cuba", "Havana"),
    ("Iran", "Tehran"), ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Greece", "Athens"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"),
    ("Denmark", "Copenhagen"), ("Belgium", "Brussels"), ("Germany", "Berlin"), ("Russia", "Moscow"),
    ("China", "Beijing"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Ghana", "Accra"), ("Senegal", "Dakar"),
    ("Mali", "Bamako"), ("Uganda", "Kampala"), ("Nepal", "Kathmandu"), ("Qatar", "Doha"), ("Oman", "Muscat"),
    ("Jordan", "Amman"), ("Lebanon", "Beirut"), ("Syria", "Damascus"), ("Iraq", "Baghdad"), ("Cyprus", "Nicosia"),
    ("Malta", "Valletta"), ("Latvia", "Riga"), ("Estonia", "Tallinn"), ("Lithuania", "Vilnius"), ("Ukraine", "Kyiv"),
    ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"),
    ("Albania", "Tirana"), ("Armenia", "Yerevan"), ("Georgia", "Tbilisi"), ("Mongolia", "Ulaanbaatar"),
    ("Argentina", "Buenos Aires"), ("Colombia", "Bogota"), ("Venezuela", "Caracas"), ("Ecuador", "Quito"),
    ("Uruguay", "Montevideo"), ("Paraguay", "Asuncion"), ("Bolivia", "Sucre"), ("Jamaica", "Kingston"),
    ("Iceland", "Reykjavik"), ("Morocco", "Rabat"), ("Tunisia", "Tunis"), ("Algeria", "Algiers"),
    ("Ethiopia", "Addis Ababa"), ("Sudan", "Khartoum"), ("Zambia", "Lusaka"), ("Angola", "Luanda"),
    ("Namibia", "Windhoek"), ("Rwanda", "Kigali"), ("Somalia", "Mogadishu"), ("Laos", "Vientiane"),
    ("Cambodia", "Phnom Penh"), ("Bhutan", "Thimphu"), ("Indonesia", "Jakarta"), ("Malaysia", "Kuala Lumpur"),
    ("Philippines", "Manila"),
]
NAMES = [
    "Ada", "Jun", "Mia", "Leo", "Ravi", "Nora", "Omar", "Lena", "Tom", "Zoe", "Ivan", "Sara", "Ken", "Lucy", "Amir",
    "Eva", "Hugo", "Ines", "Yuki", "Paul", "Rosa", "Ali", "Kim", "Dan", "Maya", "Sam", "Bea", "Olga", "Max", "Nia",
    "Raj", "Tess", "Abel", "Cleo", "Eli", "Fay", "Gus", "Hana", "Igor", "Jade", "Kofi", "Lars", "Mona", "Ned", "Opal",
    "Pia", "Quin", "Rex", "Sofi", "Theo", "Uma", "Vic", "Wes", "Xena", "Yara", "Zack", "Anya", "Boris", "Carla",
    "Dev", "Emil", "Femi", "Gia", "Hal", "Ida", "Jon", "Kai", "Lia", "Milo", "Nico", "Otto", "Pam", "Remy", "Saul",
    "Tara", "Ugo", "Vera", "Will", "Yves", "Zara",
]
OBJECTS = [  # one word each: LAMBADA's target is one word
    "apples", "books", "coins", "pens", "stamps", "shells", "cards", "maps", "letters", "photos", "seeds", "tickets",
    "gloves", "socks", "candles", "matches", "biscuits", "crackers", "papers", "notes", "envelopes", "crayons",
    "pencils", "napkins", "towels", "blankets", "batteries", "receipts", "puzzles", "leaves", "feathers", "ribbons",
    "labels", "posters", "magazines", "comics", "recipes", "cookies", "sponges", "boxes", "spices", "herbs",
    "pillows", "scarves", "hats", "sketches", "diaries", "calendars", "postcards", "newspapers", "lanterns",
    "drawings", "charts", "scrolls", "booklets", "flyers", "folders", "notebooks", "paintings", "prints", "banners",
    "badges", "pastries", "muffins",
]
PLACES = ["Millbrook", "Ashford", "Dunmore", "Kelso", "Brampton", "Fairhaven", "Oakridge", "Redcliff", "Stonebury",
          "Wexley", "Harlow", "Linton", "Marsden", "Penrith", "Quarry Hill", "Rosedale"]
THINGS = ["scarf", "hat", "sweater", "blanket", "umbrella", "wallet", "notebook", "jacket", "backpack", "camera",
          "lunchbox", "glove"]
TREES = ["oak", "maple", "birch", "willow", "cherry", "pine", "chestnut", "walnut"]
ITEMS = ["apples", "pears", "marbles", "stickers", "pencils", "eggs", "cookies", "stamps", "shells", "buttons"]

# HellaSwag: (activity, context, second context, gold ending); "{n}" is the row's name. The distractors of a row
# are the gold endings of other activities of its own split, with its name: every choice starts with the name,
# reads as a plausible sentence, and the train and eval pools of endings are disjoint.
ACTIVITIES_TRAIN = [
    ("Running", "{n} is running along a path in the park.", "after a long run",
     "{n} sits on a bench and drinks some water."),
    ("Cooking", "{n} is cooking soup in a small kitchen.", "when the soup is ready",
     "{n} ladles it into a bowl and blows on it."),
    ("Swimming", "{n} is swimming laps in a pool.", "after the last lap", "{n} climbs the ladder and grabs a towel."),
    ("Painting", "{n} is painting a fence in the yard.", "when the fence is done", "{n} rinses the brush under the tap."),
    ("Reading", "{n} is reading a novel on a bench.", "at the end of the chapter",
     "{n} folds the corner of the page and yawns."),
    ("Gardening", "{n} is planting tulips in the garden.", "after the last bulb", "{n} pats the soil flat and waters it."),
    ("Shaving", "{n} spreads shaving foam over the chin.", "then", "{n} drags a razor slowly across the skin."),
    ("Baking", "{n} is mixing flour and eggs in a bowl.", "once the batter is smooth", "{n} pours it into a greased tin."),
    ("Fishing", "{n} is sitting by a lake holding a rod.", "when the line tugs",
     "{n} reels it in and lifts a small trout."),
    ("Laundry", "{n} is pulling wet clothes from the washer.", "with the basket full",
     "{n} hangs each shirt on the line outside."),
    ("Skating", "{n} is lacing up a pair of skates.", "after tightening the laces",
     "{n} steps onto the ice and glides away."),
    ("Playing guitar", "{n} is tuning an old guitar.", "once every string sounds right",
     "{n} strums a chord and starts to sing."),
]
ACTIVITIES_EVAL = [
    ("Cycling", "{n} is pumping air into a bike tire.", "when the tire is firm",
     "{n} screws the cap back on the valve."),
    ("Washing dishes", "{n} is washing plates in the sink.", "after the last plate",
     "{n} dries both hands on a dish towel."),
    ("Camping", "{n} is setting up a tent in a field.", "once the poles are in", "{n} hammers the pegs into the ground."),
    ("Getting a haircut", "{n} is sitting in a barber's chair.", "when the cutting stops",
     "{n} looks in the mirror and nods."),
    ("Shoveling snow", "{n} is shoveling snow off the driveway.", "after clearing a path",
     "{n} leans the shovel against the garage."),
    ("Packing", "{n} is packing a suitcase for a trip.", "when it is full", "{n} sits on the lid to zip it shut."),
    ("Flying a kite", "{n} is holding a kite on a windy hill.", "as a gust arrives",
     "{n} lets out the string and it rises."),
    ("Ironing", "{n} is ironing a shirt on a board.", "when the creases are gone",
     "{n} hangs it on a hanger in the closet."),
]

# PIQA: pairs of opposite goals that share their two solutions; each pair gives two rows with swapped answers,
# so neither solution's length, position or wording gives the answer, only what the goal asks for.
PIQA_PAIRS = [
    ("keep milk cold", "warm up milk", "Put the milk in the fridge.", "Put the milk in a pot on the stove."),
    ("keep bread soft", "make bread crunchy", "Seal it in a plastic bag.", "Toast it in the toaster."),
    ("help a plant grow", "make a plant wilt", "Water it every day.", "Leave it without water."),
    ("make a room brighter", "make a room darker", "Open the curtains.", "Close the curtains."),
    ("make wet paint dry faster", "keep paint wet for later", "Point a fan at the paint.",
     "Cover the paint with plastic wrap."),
    ("sweeten a cup of tea", "cool down a cup of tea", "Stir a spoon of sugar into it.", "Add a cube of ice to it."),
    ("keep a door open", "keep a door locked", "Put a heavy wedge under it.", "Turn the key in its lock."),
    ("light a candle", "put out a candle", "Touch a burning match to the wick.", "Press a damp cloth over the wick."),
    ("drive a nail into wood", "pull a nail out of wood", "Strike it with a hammer.", "Grip it with pliers and pull."),
    ("fill a balloon", "let the air out of a balloon", "Blow air into it.", "Untie the knot at its neck."),
    ("thicken a soup", "thin a soup", "Stir in a spoon of flour.", "Stir in a cup of water."),
    ("remove wrinkles from a shirt", "pack a shirt into a small space", "Press it with a hot iron.",
     "Roll it up tightly."),
    ("sharpen a knife", "carry a knife safely", "Rub it along a whetstone.", "Slide it into a sheath."),
    ("join two pieces of rope", "cut a rope in half", "Tie the ends in a knot.", "Slice it with scissors."),
    ("keep coffee hot", "cool coffee quickly", "Pour it into a thermos.", "Pour it over a glass of ice."),
    ("calm an excited dog", "tire out an energetic dog", "Speak softly and pet it.",
     "Throw a ball for it in the yard."),
    ("hang a photo on a wall", "mail a photo to a friend", "Put it in a frame with a hook.",
     "Put it in an envelope with a stamp."),
    ("cook an egg in its shell", "make scrambled eggs", "Put it whole in boiling water.",
     "Crack it into a pan and stir."),
    ("keep apple slices from browning", "make apple slices soft", "Squeeze lemon juice on the slices.",
     "Bake the slices in the oven."),
    ("inflate a bike tube", "find the hole in a bike tube", "Attach a pump to the valve.",
     "Dip the tube in a tub of water."),
    ("dry soaked shoes", "clean muddy shoes", "Stuff them with newspaper.", "Scrub them with a brush and soap."),
    ("let fresh air into a room", "keep the rain out of a room", "Slide the window open.",
     "Shut the window and latch it."),
    ("loosen a screw", "tighten a screw", "Turn it counterclockwise.", "Turn it clockwise."),
    ("check whether a cake is baked", "stop a cake sticking to its pan", "Poke a toothpick into the middle.",
     "Grease the pan with butter first."),
    ("charge a phone", "silence a phone", "Plug it into the wall.", "Flip the switch on its side."),
    ("make a plank smooth", "set a plank on fire", "Rub it with sandpaper.", "Hold a flame under it."),
    ("cook dry pasta", "drain cooked pasta", "Drop it into boiling water.", "Pour it into a colander."),
    ("seal an envelope", "open a sealed envelope", "Lick the flap and press it shut.",
     "Slide a knife along the flap."),
    ("dry wet hair", "curl straight hair", "Blow it with a hair dryer.", "Wrap it around a hot curler."),
    ("open a stuck jar", "close a jar tightly", "Run hot water over the lid.", "Twist the lid until it stops."),
    ("make a flashlight shine", "save a flashlight's batteries", "Push the switch forward.",
     "Take the batteries out."),
    ("ripen hard pears", "keep ripe pears fresh longer", "Leave them in a paper bag.", "Keep them in the fridge."),
    ("start a campfire", "put out a campfire", "Add dry twigs and blow.", "Pour a bucket of sand on it."),
    ("shrink a wool sweater", "remove a stain from a sweater", "Wash it in hot water and tumble dry.",
     "Soak it in stain remover."),
    ("make a wooden floor shine", "dry a spill on the floor", "Rub it with wax.", "Soak it up with a towel."),
    ("stop a moving car", "make a car go faster", "Press the brake pedal.", "Press the gas pedal."),
    ("keep a soda fizzy", "make a soda go flat", "Screw the cap on tight.", "Leave the cap off overnight."),
    ("make a sand castle firm", "knock down a sand castle", "Wet the sand before packing it.",
     "Kick it with your foot."),
    ("grow a thicker lawn", "keep a lawn short", "Water the lawn often.", "Mow the lawn often."),
    ("keep a message secret", "share a message with everyone", "Write it in a locked diary.",
     "Post it on a public board."),
]
PIQA_GOALS = ["How do you {g}?", "To {g}, what should you do?", "What is a good way to {g}?", "I want to {g}."]

# LAMBADA: the last word is the target and appears earlier in the passage; train and eval use different
# templates (and names, objects, places). {n}/{m} names, {o} objects, {p} places, {t} things, {r} trees.
LAMBADA_TRAIN = [
    "{n} put the {o} on the shelf and smiled. Later that evening, everyone admired the {o}",
    "{n} lost a {t} at the market on Monday. On Friday a stranger knocked on the door holding the missing {t}",
    "{n} and {m} argued about the map for an hour. In the end it was {m} who found the way, and {n} had to thank {m}",
    "The town of {p} has one bakery and one bridge. Visitors come for the bread, but they always take photos of "
    "the bridge in {p}",
    "{n} wrote a long letter to {m} and sealed it carefully. The next morning the postman carried the letter to {m}",
    "Every winter {n} makes a {t} for a friend. This year the friend asked for a red {t}",
    "{n} could not sleep because of the storm. The thunder was so loud that the cat hid under the bed next to {n}",
    "The {o} were on sale, so {n} bought ten of them. At home there was no room to store the {o}",
]
LAMBADA_EVAL = [
    "{n} practised the piano every day for a year. At the concert the whole hall went quiet when {n}",
    "A {t} was left on the bus this morning. The driver kept it in a box until {n} came back asking for the {t}",
    "{n} told {m} a secret and asked for silence. A week later the whole class knew, and {n} never trusted {m}",
    "The river near {p} floods every spring. Each year the farmers build the wall a little higher to protect {p}",
    "{n} planted a small {r} by the gate. Twenty years later children climb the branches of that {r}",
    "The {o} in the drawer were all broken, so {n} went to the shop for new {o}",
]

# GSM8K: (question, worked answer, result); a, b random, x the item, n the name.
GSM8K_TEMPLATES = [
    ("{n} has {a} {x} and buys {b} more. How many {x} does {n} have now?",
     "{n} has {a} + {b} = <<{a}+{b}={r}>>{r} {x}.", lambda a, b: a + b),
    ("{n} had {a} {x} and gave {b} of them to a friend. How many {x} does {n} have left?",
     "{n} has {a} - {b} = <<{a}-{b}={r}>>{r} {x} left.", lambda a, b: a - b),
    ("{n} fills {a} boxes with {b} {x} each. How many {x} are in the boxes?",
     "The boxes hold {a} * {b} = <<{a}*{b}={r}>>{r} {x}.", lambda a, b: a * b),
    ("A shop sells {x} in packs of {b}. {n} buys {a} packs. How many {x} does {n} get?",
     "{n} gets {a} * {b} = <<{a}*{b}={r}>>{r} {x}.", lambda a, b: a * b),
]


def disjoint(rng: random.Random, pool: list, n_train: int, n_eval: int) -> tuple[list, list]:
    pool = list(pool)
    rng.shuffle(pool)
    assert len(pool) >= n_train + n_eval, (len(pool), n_train, n_eval)
    return pool[:n_train], pool[n_train:n_train + n_eval]


def insert_gold(rng: random.Random, wrong: list, gold) -> tuple[list, int]:
    k = rng.randrange(len(wrong) + 1)
    return wrong[:k] + [gold] + wrong[k:], k


def gsm8k(rng):
    names = disjoint(rng, NAMES, N_TRAIN, N_EVAL)
    seen, out = set(), {}
    for part, part_names in zip(("train", "eval"), names):
        rows = []
        for name in part_names:
            while True:  # no two rows share a question but for the name
                q, a_text, f = GSM8K_TEMPLATES[rng.randrange(len(GSM8K_TEMPLATES))]
                a, b, x = rng.randrange(3, 40), rng.randrange(2, 12), rng.choice(ITEMS)
                if f(a, b) > 0 and (q, a, b, x) not in seen:
                    break
            seen.add((q, a, b, x))
            r = f(a, b)
            rows.append({"question": q.format(n=name, a=a, b=b, x=x),
                         "answer": a_text.format(n=name, a=a, b=b, x=x, r=r) + f"\n#### {r}"})
        out[part] = rows
    return out


def capitals(rng, task):
    train, evaluation = disjoint(rng, COUNTRIES, len(COUNTRIES) - N_EVAL, N_EVAL)
    out = {}
    for part, countries in (("train", train), ("eval", evaluation)):
        rows = []
        for i, (country, cap) in enumerate(countries):
            if task == "squad":
                ctx = (f"{country} is a country. Its capital city is {cap}, which is also its largest city. "
                       f"Many people visit {cap} every year.")
                s = ctx.index(cap)
                rows.append({"id": f"s{part}{i}", "title": country, "context": ctx,
                             "question": f"What is the capital of {country}?",
                             "answers": {"text": [cap, cap], "answer_start": [s, s]}})
            elif task == "commonsense_qa":  # distractors: capitals of the same split's countries
                wrong = rng.sample([c for _, c in countries if c != cap], 4)
                texts, k = insert_gold(rng, wrong, cap)
                rows.append({"id": f"c{part}{i}", "question": f"Which city is the capital of {country}?",
                             "question_concept": "capital", "choices": {"label": list("ABCDE"), "text": texts},
                             "answerKey": "ABCDE"[k]})
            elif task == "webqs":
                rows.append({"url": f"http://www.freebase.com/view/en/{country.lower().replace(' ', '_')}",
                             "question": f"what is the capital city of {country.lower()}?", "answers": [cap]})
            else:  # nq_open
                rows.append({"question": f"what is the capital of {country.lower()}", "answer": [cap]})
        out[part] = rows
    return out


def coqa(rng):
    names = disjoint(rng, NAMES, N_TRAIN, N_EVAL)
    objects = disjoint(rng, OBJECTS, N_TRAIN // 2, N_EVAL // 2)
    countries = disjoint(rng, COUNTRIES, len(COUNTRIES) - N_EVAL, N_EVAL)
    out = {}
    for p, part in enumerate(("train", "eval")):
        rows = []
        for i, name in enumerate(names[p]):
            (country, cap), obj = countries[p][i % len(countries[p])], objects[p][i % len(objects[p])]
            story = (f"{name} lived in {cap}, the capital of {country}. Every morning {name} collected {obj} by the "
                     f"river. One day {name} found a map.")
            zeros = [0, 0, 0]
            rows.append({"source": "sample", "story": story,
                         "questions": {"input_text": [f"Where did {name} live?", f"What did {name} collect?",
                                                      "What was found one day?"],
                                       "answer_start": zeros, "answer_end": zeros},
                         "answers": {"input_text": [cap, obj, "a map"], "answer_start": zeros, "answer_end": zeros}})
        out[part] = rows
    return out


def hellaswag(rng):
    names = disjoint(rng, NAMES, N_TRAIN, N_EVAL)
    out = {}
    for p, (part, activities) in enumerate((("train", ACTIVITIES_TRAIN), ("eval", ACTIVITIES_EVAL))):
        rows = []
        for i, name in enumerate(names[p]):
            activity, ctx_a, ctx_b, gold = activities[i % len(activities)]
            others = [a[3] for a in activities if a[3] != gold]
            wrong = [e.format(n=name) for e in rng.sample(others, 3)]
            endings, k = insert_gold(rng, wrong, gold.format(n=name))
            ctx_a = ctx_a.format(n=name)
            rows.append({"ind": i, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b,
                         "ctx": f"{ctx_a} {ctx_b[0].upper()}{ctx_b[1:]}", "endings": endings,
                         "source_id": f"h{part}{i}", "split": "val" if part == "eval" else "train",
                         "split_type": "indomain", "label": str(k)})
        out[part] = rows
    return out


def piqa(rng):
    pairs = disjoint(rng, PIQA_PAIRS, N_TRAIN // 2, N_EVAL // 2)
    out = {}
    for part, part_pairs in zip(("train", "eval"), pairs):
        rows = []
        for goal_a, goal_b, sol_a, sol_b in part_pairs:
            first = [sol_a, sol_b] if rng.randrange(2) == 0 else [sol_b, sol_a]  # one order for both rows
            for goal, sol in ((goal_a, sol_a), (goal_b, sol_b)):
                rows.append({"goal": rng.choice(PIQA_GOALS).format(g=goal), "sol1": first[0], "sol2": first[1],
                             "label": first.index(sol)})
        rng.shuffle(rows)
        out[part] = rows
    return out


def lambada(rng):
    names, objects = disjoint(rng, NAMES, N_TRAIN, N_EVAL), disjoint(rng, OBJECTS, 32, 32)
    half = lambda pool: (pool[:len(pool) // 2], pool[len(pool) // 2:])  # noqa: E731
    places, things, trees = half(PLACES), half(THINGS), half(TREES)
    fill = {part: dict(n=names[p], o=objects[p], p=places[p], t=things[p],
                       r=trees[p]) for p, part in enumerate(("train", "eval"))}
    out = {}
    for part, templates, n in (("train", LAMBADA_TRAIN, N_TRAIN), ("eval", LAMBADA_EVAL, N_EVAL)):
        slots, texts = fill[part], set()
        for i in range(n):
            while True:  # each row its own passage
                values = {k: (v[i] if k == "n" else rng.choice(v)) for k, v in slots.items()}
                values["m"] = rng.choice([m for m in slots["n"] if m != values["n"]])
                text = templates[i % len(templates)].format(**values)
                if text not in texts:
                    break
            texts.add(text)
        rows = [{"text": t} for t in sorted(texts)]
        rng.shuffle(rows)
        out[part] = rows
    return out


TASKS = {"gsm8k": gsm8k, "squad": lambda rng: capitals(rng, "squad"), "coqa": coqa,
         "commonsense_qa": lambda rng: capitals(rng, "commonsense_qa"), "piqa": piqa, "hellaswag": hellaswag,
         "lambada": lambada, "webqs": lambda rng: capitals(rng, "webqs"), "nq_open": lambda rng: capitals(rng, "nq_open")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = argv[0] if argv else os.path.dirname(os.path.abspath(__file__))
    for task, make in TASKS.items():
        rows = make(random.Random(f"{SEED}-{task}"))  # one stream per task: changing one task keeps the others
        os.makedirs(os.path.join(out_dir, task), exist_ok=True)
        for part in ("train", "eval"):
            with open(os.path.join(out_dir, task, f"{part}.jsonl"), "w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows[part])
            print(f"{task} {part}: {len(rows[part])} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
