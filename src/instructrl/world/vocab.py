"""The closed vocabulary the built-in world is written in.

Small on purpose: a model of a few million parameters can learn it on a laptop, and the
pretraining corpus and the instruction tasks share it, so SFT only has to teach the format.
"""

ANIMALS = (
    "cat", "dog", "fox", "owl", "bear", "wolf", "lion", "tiger", "horse", "mouse",
    "eagle", "otter", "panda", "zebra", "camel", "sheep", "goat", "frog", "duck", "crab",
)
FRUITS = (
    "apple", "pear", "plum", "lemon", "mango", "grape", "peach", "melon", "berry", "cherry",
    "kiwi", "lime", "fig", "date", "olive",
)
COLORS = ("red", "blue", "green", "black", "white", "brown", "pink", "gold", "gray", "orange")
THINGS = (
    "stone", "river", "cloud", "tree", "house", "boat", "lamp", "chair", "table", "book",
    "road", "hill", "star", "bell", "coin", "ring", "door", "cup", "key", "map",
)
NAMES = ("anna", "ben", "cara", "dan", "eva", "finn", "gina", "hugo", "iris", "jack", "kim", "leo")
VERBS = ("sees", "finds", "likes", "wants", "keeps", "holds", "brings", "paints")

NOUNS = ANIMALS + FRUITS + THINGS
WORDS = NOUNS + COLORS
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")
