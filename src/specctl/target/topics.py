"""Topics that steer self-prompts, and the filter that rejects degenerate ones.

A bare Magpie-style self-prompt (sample right after the user header) drifts to the few
questions a small model likes to ask; steering each sample with a topic in the system turn
spreads the prompts over the task styles MT-Bench measures (its eight categories) plus
everyday chat. The topic is a function of the sample's seed, so it is deterministic per
sample id and uniform over ids. The steering system turn is used only to write the user
turn: the sample itself is rendered without it (the answer is regenerated under the
template's default system prompt, as in evaluation).
"""

from __future__ import annotations

import re

TOPICS: tuple[tuple[str, str], ...] = (
    ("coding", "a programming task: write, explain, debug or review code"),
    ("math", "a math problem or a question about a mathematical idea"),
    ("writing", "a writing request: a story, poem, email, essay or blog post"),
    ("reasoning", "a logic puzzle or a question that needs careful step-by-step reasoning"),
    ("roleplay", "a request to play a character or act out an imagined scenario"),
    ("extraction", "a request to extract, summarise or reformat information from a given text"),
    ("stem", "a question about science, technology, engineering or medicine"),
    ("humanities", "a question about history, philosophy, economics, law, art or culture"),
    ("chat", "everyday conversation: advice, opinions, plans or small talk"),
)
FALLBACK = {
    "coding": "Write a Python function that checks whether a string is a palindrome.",
    "math": "What is the sum of the first 100 positive integers, and how do you find it?",
    "writing": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "reasoning": "If all bloops are razzies and all razzies are lazzies, are all bloops lazzies?",
    "roleplay": "Pretend you are a tour guide in ancient Rome and welcome me to the city.",
    "extraction": "Summarise in one sentence: The meeting moved to Friday because two "
    "members were travelling.",
    "stem": "How do vaccines train the immune system?",
    "humanities": "What were the main causes of the French Revolution?",
    "chat": "What are some good ways to relax after a long day?",
}


def topic_of(seed: int) -> tuple[str, str]:
    """(name, description) of a sample's topic: uniform over TOPICS, fixed by the seed."""
    return TOPICS[seed % len(TOPICS)]


def steering(description: str) -> str:
    """The system turn that steers a self-prompt towards a topic."""
    return (
        "You are a helpful assistant. The user's next message is "
        f"{description}. The user writes it in their own words."
    )


_RUN = re.compile(r"(.)\1{7,}")  # 8+ of the same character


def degenerate(text: str) -> bool:
    """Reject empty, too short or repetitive prompts (what small samplers produce when stuck)."""
    text = text.strip()
    words = text.split()
    if len(text) < 12 or len(words) < 3:
        return True
    if len(words) >= 8 and len({w.lower() for w in words}) / len(words) < 0.5:
        return True
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) >= 3 and len(set(lines)) <= len(lines) // 2:
        return True
    return bool(_RUN.search(text.replace(" ", "")))
