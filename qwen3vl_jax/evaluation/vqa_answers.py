"""The answer normalisation of the VQA evaluation (Antol et al. 2015, vqaEval.py; EvalAI's answer processor, as
lmms-eval's `EvalAIAnswerProcessor` applies it to TextVQA and VQAv2): `vqa_normalize` and the tables it reads
(contractions, number words, articles, punctuation). `benchmark_metrics.vqa_accuracy` compares answers in this
form."""

from __future__ import annotations

import re

# The VQA evaluation's contraction table (Antol et al. 2015, vqaEval.py; EvalAI's answer processor), written as
# "missing-apostrophe form:contraction" pairs; only entries a lower-cased answer can reach are listed.
_CONTRACTIONS = dict(
    pair.split(":")
    for pair in """
    aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
    couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
    hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd
    howll:how'll hows:how's isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll maam:ma'am
    mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
    neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't 'ows'at:'ow's'at shant:shan't shed've:she'd've
    she'dve:she'd've shouldve:should've shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've
    somebody'd:somebodyd somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll
    somebodys:somebody's someoned:someone'd someoned've:someone'd've someone'dve:someone'd've
    someonell:someone'll someones:someone's somethingd:something'd somethingd've:something'd've
    something'dve:something'd've somethingll:something'll thats:that's thered:there'd thered've:there'd've
    there'dve:there'd've therere:there're theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've
    theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've
    weve:we've werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's
    whered:where'd wheres:where's whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll
    whos:who's whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't
    wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll
    yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've
    you'dve:you'd've youll:you'll youre:you're youve:you've
    """.split()
)
_VQA_NUMBERS = {
    word: str(value) for value, word in enumerate("zero one two three four five six seven eight nine ten".split())
}
_VQA_NUMBERS["none"] = "0"
_VQA_ARTICLES = frozenset({"a", "an", "the"})
# the evaluation's list ("," and "?" are already removed by then)
_VQA_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
_VQA_PERIOD = re.compile(r"\.(?!\d)")  # a period not starting a decimal part ("2.5" keeps its period)


def vqa_normalize(answer: str) -> str:
    """An answer as the VQA / TextVQA evaluation compares it (EvalAI's answer processor, used by lmms-eval's
    `EvalAIAnswerProcessor`): lower-cased; "," and "?" removed; "'s" split off; each punctuation mark removed when
    it touches a space somewhere in the answer, else replaced by a space; periods not followed by a digit removed;
    number words zero..ten and "none" turned into digits; articles a/an/the dropped; contractions missing their
    apostrophe restored ("dont" -> "don't")."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    stripped = text
    for mark in _VQA_PUNCTUATION:
        # the test looks at the answer before any mark was replaced, as the reference does
        stripped = stripped.replace(mark, "" if (mark + " " in text or " " + mark in text) else " ")
    stripped = _VQA_PERIOD.sub("", stripped)
    words = [_VQA_NUMBERS.get(word, word) for word in stripped.split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _VQA_ARTICLES]
    return " ".join(words)
