"""Writes the quickstart's sample data into examples/data/ (deterministic; written for this project).

- sft_alpaca.jsonl    Alpaca-format rows (instruction/input/output), answers of varied length and quality,
                      plus two deliberately bad rows that the select stage sets aside with a reason;
- sft_sharegpt.json   ShareGPT/FastChat rows, some multi-turn;
- preferences.jsonl   prompt/chosen/rejected pairs (chosen: a helpful answer; rejected: a vague or wrong one);
- preferences_hh.jsonl  the same kind of pairs as HH-RLHF "\\n\\nHuman:/\\n\\nAssistant:" transcripts;
- eval_prompts.jsonl  a small Vicuna-style eval set {question_id, text, category}.

Run: python scripts/make_examples.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "examples" / "data"

# topic: (question phrasings, facts that a good answer covers, a vague answer, a wrong answer)
TOPICS = {
    "sleep": (["How can I sleep better?", "Give me tips for better sleep.", "What helps with falling asleep?"],
              ["Go to bed and wake up at the same time every day, weekends included.",
               "Keep the bedroom dark, quiet and slightly cool.",
               "Avoid caffeine after midday and large meals late in the evening.",
               "Put screens away for the last half hour before bed.",
               "If you cannot sleep after twenty minutes, get up and read until you feel sleepy."],
              "Just try to relax.", "Drink a strong coffee before bed so your body gets tired faster."),
    "time": (["How can I manage my time better?", "What are good time management habits?"],
             ["Write down every task so nothing lives only in your head.",
              "Pick the two or three tasks that matter most each day and do them first.",
              "Break large tasks into steps that take less than an hour.",
              "Block time in your calendar for focused work and protect it.",
              "Review the week every Friday and plan the next one."],
             "Be more organised.", "Multitask as much as possible; it always saves time."),
    "python_list": (["How do I reverse a list in Python?", "What is the way to reverse a Python list?"],
                    ["`my_list.reverse()` reverses the list in place and returns None.",
                     "`my_list[::-1]` returns a new reversed list and leaves the original alone.",
                     "`reversed(my_list)` returns an iterator, useful in a for loop.",
                     "Choose in-place reversal when the list is large and you no longer need the original order."],
                    "Use Python.", "Call `my_list.sort(reverse=True)`; it reverses the list."),
    "photosynthesis": (["Explain photosynthesis simply.", "What is photosynthesis?"],
                       ["Plants capture light energy with chlorophyll in their leaves.",
                        "They take in carbon dioxide from the air and water from the soil.",
                        "Light energy turns these into glucose, a sugar the plant uses for energy and growth.",
                        "Oxygen is released as a by-product, which is the oxygen animals breathe."],
                       "Plants make food.", "Plants absorb oxygen and release carbon dioxide to make food."),
    "budget": (["How do I start a personal budget?", "Help me make a monthly budget."],
               ["List your monthly income after tax.",
                "Track every expense for a month to see where the money goes.",
                "Split spending into needs, wants and savings; 50/30/20 is a common starting point.",
                "Set up an automatic transfer to savings on payday.",
                "Review the budget each month and adjust categories that were unrealistic."],
               "Spend less money.", "Put all your savings into one stock; budgets are unnecessary then."),
    "water_cycle": (["Describe the water cycle.", "How does the water cycle work?"],
                    ["The sun heats water in oceans, lakes and rivers and it evaporates.",
                     "Water vapour rises, cools and condenses into clouds.",
                     "Water falls back as precipitation: rain, snow or hail.",
                     "It collects in rivers, lakes, oceans and groundwater, and the cycle repeats."],
                    "Water goes up and down.", "Clouds are made of smoke that turns into rain."),
    "interview": (["How should I prepare for a job interview?", "Tips for a job interview?"],
                  ["Research the company, its products and its recent news.",
                   "Reread the job description and match each requirement to an example from your experience.",
                   "Prepare short stories in the situation-task-action-result form.",
                   "Prepare two or three questions of your own for the interviewer.",
                   "Test the route or the video call set-up the day before."],
                  "Be yourself.", "Do not prepare at all; spontaneous answers always impress more."),
    "exercise": (["How do I start exercising regularly?", "What is a good way to begin working out?"],
                 ["Start small: three sessions of twenty minutes a week.",
                  "Choose an activity you enjoy, such as walking, cycling or swimming.",
                  "Schedule the sessions like appointments.",
                  "Increase duration or intensity by about ten percent a week.",
                  "Rest days matter: muscles recover and grow between sessions."],
                 "Go to the gym.", "Train as hard as possible every day from the first week."),
    "email": (["Write a polite email asking for a deadline extension.",
               "Draft an email to my manager requesting more time on a project."],
              ["Subject: Request for a short extension on the report.",
               "Dear Ms. Lee, thank you for your guidance on the quarterly report.",
               "Because the final sales figures arrive on Thursday, I would like to ask for an extension until Monday.",
               "This will let me include complete data and check the analysis carefully.",
               "I am happy to share a draft of the finished sections on Friday. Best regards, Sam"],
              "Ask for more time.", "Tell your manager the deadline was unfair and you will submit whenever you can."),
    "recursion": (["What is recursion in programming?", "Explain recursion with an example."],
                  ["Recursion is when a function calls itself to solve a smaller version of the same problem.",
                   "Every recursive function needs a base case that stops the calls.",
                   "For example, factorial(n) returns 1 when n is 0, else n * factorial(n - 1).",
                   "Each call waits on the stack until the smaller call returns.",
                   "Deep recursion can exceed the stack limit, so loops are sometimes safer."],
                  "A function that repeats.", "Recursion is a loop that never ends; it has no base case."),
    "stress": (["How can I deal with stress?", "What are effective ways to reduce stress?"],
               ["Name the source of the stress and separate what you can control from what you cannot.",
                "Exercise regularly; even a short walk lowers stress hormones.",
                "Practise slow breathing: four seconds in, six seconds out, for a few minutes.",
                "Protect your sleep and keep regular meals.",
                "Talk to someone you trust, or a professional if stress lasts for weeks."],
               "Don't worry.", "Ignore stress completely and work longer hours until it goes away."),
    "compost": (["How do I start composting at home?", "Explain home composting."],
                ["Choose a bin or a corner of the garden with some shade.",
                 "Mix green material, like vegetable scraps and grass, with brown material, like leaves and cardboard.",
                 "Keep the pile as moist as a wrung-out sponge.",
                 "Turn it every week or two to let air in.",
                 "In two to six months you get dark, crumbly compost for the garden."],
                "Throw food in a bin.", "Add meat, oil and plastic to the compost; they break down fastest."),
    "git": (["How do I undo my last git commit?", "What does git reset do to my last commit?"],
            ["`git reset --soft HEAD~1` undoes the commit and keeps the changes staged.",
             "`git reset --mixed HEAD~1` undoes the commit and keeps the changes unstaged.",
             "`git reset --hard HEAD~1` discards the commit and its changes, so use it with care.",
             "If the commit was already pushed, `git revert HEAD` makes a new commit that undoes it safely."],
            "Use git.", "Delete the .git folder and start the repository again."),
    "learn_language": (["How can I learn a new language faster?", "Tips for learning a foreign language?"],
                       ["Practise a little every day instead of a lot once a week.",
                        "Learn the thousand most common words first.",
                        "Use spaced-repetition flashcards to review vocabulary.",
                        "Speak from the first week, even with mistakes, with a tutor or a language partner.",
                        "Listen to podcasts or series in the language to train your ear."],
                       "Study hard.", "Only read grammar books for a year before you try to speak."),
    "climate": (["What causes climate change?", "Why is the climate getting warmer?"],
                ["Burning coal, oil and gas releases carbon dioxide.",
                 "Carbon dioxide and methane trap heat in the atmosphere: the greenhouse effect.",
                 "Deforestation removes trees that would absorb carbon dioxide.",
                 "Agriculture and livestock add methane and nitrous oxide.",
                 "More trapped heat raises average temperatures and changes weather patterns."],
                "Pollution.", "The climate warms because the Earth is moving closer to the Sun each year."),
    "bread": (["How do I bake simple bread?", "Give me a basic bread recipe."],
              ["Mix 500 g flour, 10 g salt, 7 g dried yeast and 320 ml warm water.",
               "Knead for ten minutes until the dough is smooth and elastic.",
               "Let it rise, covered, for about an hour until doubled.",
               "Shape the loaf, let it rise again for thirty minutes.",
               "Bake at 220 degrees Celsius for 30 to 35 minutes, until it sounds hollow when tapped."],
              "Mix flour and bake it.", "Bake the dough right after mixing; rising is optional and slows you down."),
}

EVAL = [
    ("generic", "How can I improve my focus while studying?"),
    ("generic", "What are some healthy breakfast ideas?"),
    ("knowledge", "Why is the sky blue?"),
    ("knowledge", "What is the difference between weather and climate?"),
    ("coding", "How do I read a file line by line in Python?"),
    ("coding", "What does a hash map do?"),
    ("writing", "Write a short thank-you note to a colleague who helped me."),
    ("writing", "Write two sentences describing an autumn morning."),
    ("advice", "How do I prepare for a long hike?"),
    ("advice", "How can I save money on groceries?"),
    ("knowledge", "How do vaccines work?"),
    ("reasoning", "If I have three apples and eat one, then buy four more, how many do I have?"),
    ("advice", "How do I keep houseplants alive?"),
    ("coding", "Explain what a unit test is."),
    ("writing", "Give me three ideas for a birthday party."),
    ("knowledge", "What does a CPU do in a computer?"),
]


def long_answer(facts: list[str], rng: random.Random) -> str:
    intro = rng.choice(["Here is a practical approach:", "A few steps help most:", "Good question. In short:"])
    steps = "\n".join(f"{i}. {f}" for i, f in enumerate(facts, 1))
    outro = rng.choice(["Start with one step and build from there.", "Small, consistent changes work best.",
                        "Together these make a real difference."])
    return f"{intro}\n\n{steps}\n\n{outro}"


def medium_answer(facts: list[str], rng: random.Random) -> str:
    return " ".join(rng.sample(facts, k=min(2, len(facts))))


def main() -> None:
    rng = random.Random(7)
    OUT.mkdir(parents=True, exist_ok=True)
    alpaca, sharegpt, prefs, hh = [], [], [], []
    n = 0
    for topic, (questions, facts, vague, wrong) in TOPICS.items():
        for qi, q in enumerate(questions):
            for variant in range(6):
                kind = ["long", "medium", "short", "vague", "long", "medium"][variant]
                shuffled = facts[:]
                rng.shuffle(shuffled)
                answer = {"long": long_answer(shuffled, rng), "medium": medium_answer(shuffled, rng),
                          "short": shuffled[0], "vague": vague}[kind]
                n += 1
                if variant % 2 == 0:
                    extra = rng.choice(["", "", "Keep it brief.", "I am a beginner."])
                    alpaca.append({"id": f"alpaca-{topic}-{qi}-{variant}", "instruction": q, "input": extra,
                                   "output": answer})
                else:
                    conv = [{"from": "human", "value": q}, {"from": "gpt", "value": answer}]
                    if kind == "medium":
                        conv += [{"from": "human", "value": "Can you say more?"},
                                 {"from": "gpt", "value": long_answer(shuffled, rng)}]
                    sharegpt.append({"id": f"sharegpt-{topic}-{qi}-{variant}", "conversations": conv})
            for rep in range(7):
                shuffled = facts[:]
                rng.shuffle(shuffled)
                good = long_answer(shuffled, rng) if rep % 2 == 0 else medium_answer(shuffled, rng)
                bad = wrong if rep % 2 == 0 else vague
                prefs.append({"id": f"pair-{topic}-{qi}-{rep}", "prompt": q, "chosen": good, "rejected": bad})
                if rep == 0:
                    hh.append({"chosen": f"\n\nHuman: {q}\n\nAssistant: {good}",
                               "rejected": f"\n\nHuman: {q}\n\nAssistant: {bad}"})
    # Two bad rows: the select stage sets them aside with the file, row and field.
    alpaca.append({"id": "alpaca-bad-empty-output", "instruction": "Name three rivers.", "input": "", "output": "  "})
    alpaca.append({"id": "alpaca-bad-no-instruction", "input": "", "output": "The Nile, the Amazon and the Danube."})

    def dump_jsonl(name: str, rows: list[dict]) -> None:
        with open(OUT / name, "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    dump_jsonl("sft_alpaca.jsonl", alpaca)
    (OUT / "sft_sharegpt.json").write_text(json.dumps(sharegpt, indent=1, ensure_ascii=False) + "\n")
    dump_jsonl("preferences.jsonl", prefs)
    dump_jsonl("preferences_hh.jsonl", hh)
    dump_jsonl("eval_prompts.jsonl",
               [{"question_id": i + 1, "text": t, "category": c} for i, (c, t) in enumerate(EVAL)])
    print(f"{len(alpaca)} alpaca + {len(sharegpt)} sharegpt rows, {len(prefs)} pairs, {len(hh)} hh pairs, "
          f"{len(EVAL)} eval prompts in {OUT}")


if __name__ == "__main__":
    main()
