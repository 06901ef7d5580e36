"""Tagging: per-message keyword tagging cost with 10 rules and with 10,000 rules, on the same messages.

    python -m bench.tagging [--messages 2000] [--rounds 5] [--rules 10000]

Both taggers are the project's KeywordTagger (jieba segmentation through rjieba, one index lookup
per token) built from generated Chinese and English keywords; messages contain keywords of both rule
sets. The two are timed alternately (A B A B) and the headline is the ratio of the medians
(10,000 / 10). The dictionary is process-wide, so both taggers segment with it once the big rule set
is built; the 10-rule tagger is also timed before that, alone. The segmenter alone, and Python's
jieba when installed (not a dependency), are timed on the same messages for comparison only.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable, Sequence

from bench.common import table, write_results
from scrm.config import KeywordRule
from scrm.tagging import KeywordTagger, normalize, segmenter

#: Common characters for generated Chinese keywords and filler text.
HANZI = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定"
         "行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政"
         "四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已"
         "通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强"
         "放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再"
         "采转更单风切打白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需")
WORDS = ("milk", "powder", "coupon", "discount", "price", "order", "buy", "baby", "formula", "gift", "member", "points",
         "delivery", "refund", "size", "color", "stock", "bundle", "sale", "vip")
FILLER = ["你好", "请问", "这个", "多少钱", "有没有", "我想", "谢谢", "宝宝", "今天", "什么时候", "发货", "可以吗", "hello",
          "please", "thanks", "how much", "when", "is it", "包邮", "尺码"]


def generate_rules(n: int, rng: random.Random, tag_prefix: str) -> list[KeywordRule]:
    """``n`` rules of three keywords each (two Chinese, one English compound), all distinct."""
    seen: set[str] = set()
    rules = []

    def fresh(make: Callable[[], str]) -> str:
        while (word := make()) in seen:
            pass
        seen.add(word)
        return word

    for i in range(n):
        zh = [fresh(lambda: "".join(rng.choices(HANZI, k=rng.randint(2, 4)))) for _ in range(2)]
        en = fresh(lambda: f"{rng.choice(WORDS)}{rng.randint(0, 99999)}")
        rules.append(KeywordRule(tag=f"{tag_prefix}{i}", keywords=[*zh, en]))
    return rules


def generate_messages(n: int, rng: random.Random, keywords: Sequence[str]) -> list[str]:
    """Chat-sized messages: filler words with a keyword or two from either rule set."""
    messages = []
    for _ in range(n):
        parts = rng.choices(FILLER, k=rng.randint(3, 8))
        for _ in range(rng.randint(0, 2)):
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(keywords))
        messages.append(("" if rng.random() < 0.6 else " ").join(parts))
    return messages


def time_per_message(fn: Callable[[str], object], messages: Sequence[str]) -> float:
    """Microseconds per message over the whole list."""
    start = time.perf_counter()
    for text in messages:
        fn(text)
    return (time.perf_counter() - start) / len(messages) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5, help="A B pairs")
    parser.add_argument("--rules", type=int, default=10_000)
    args = parser.parse_args()
    rng = random.Random(20241127)

    small_rules = generate_rules(10, rng, "small-")
    big_rules = generate_rules(args.rules, rng, "big-")
    small_keywords = [k for r in small_rules for k in r.keywords]
    big_keywords = [k for r in big_rules for k in r.keywords]
    messages = generate_messages(args.messages, rng, small_keywords + rng.sample(big_keywords, 200))

    small = KeywordTagger(small_rules)
    for _ in range(2):
        time_per_message(small.match, messages)  # warm-up
    alone = statistics.median(time_per_message(small.match, messages) for _ in range(args.rounds))

    start = time.perf_counter()
    big = KeywordTagger(big_rules)
    build_seconds = time.perf_counter() - start
    time_per_message(big.match, messages)  # warm-up
    a: list[float] = []
    b: list[float] = []
    for _ in range(args.rounds):
        a.append(time_per_message(small.match, messages))
        b.append(time_per_message(big.match, messages))
    small_us, big_us = statistics.median(a), statistics.median(b)
    hits_small = sum(len(small.match(m)) for m in messages)
    hits_big = sum(len(big.match(m)) for m in messages)

    rows = [("", "µs / message", "tag hits"),
            ("10 rules, before the big set joined the dictionary", f"{alone:.1f}", ""),
            ("10 rules", f"{small_us:.1f}", str(hits_small)),
            (f"{args.rules:,} rules", f"{big_us:.1f}", str(hits_big))]
    figures: dict[str, object] = {
        "messages": len(messages), "rounds": args.rounds, "rules_small": 10, "rules_big": args.rules,
        "small_alone_us": round(alone, 2), "small_us": round(small_us, 2), "big_us": round(big_us, 2),
        "small_runs_us": [round(x, 2) for x in a], "big_runs_us": [round(x, 2) for x in b],
        "big_build_seconds": round(build_seconds, 2), "hits_small": hits_small, "hits_big": hits_big,
    }

    normalized = [normalize(m) for m in messages]
    cut_us = statistics.median(time_per_message(segmenter().cut, normalized) for _ in range(args.rounds))
    rows.append(("segmentation alone (rjieba, same dictionary)", f"{cut_us:.1f}", ""))
    figures["rjieba_us"] = round(cut_us, 2)
    try:
        import jieba
    except ImportError:
        figures["jieba_lcut_us"] = None
    else:
        for word in {normalize(k) for r in small_rules + big_rules for k in r.keywords}:
            jieba.add_word(word, freq=100_000)
        time_per_message(jieba.lcut, normalized)
        jieba_us = statistics.median(time_per_message(jieba.lcut, normalized) for _ in range(args.rounds))
        rows.append(("Python jieba.lcut alone (for comparison)", f"{jieba_us:.1f}", ""))
        figures["jieba_lcut_us"] = round(jieba_us, 2)

    ratio = big_us / small_us
    figures |= {"ratio": round(ratio, 3), "target_ratio": 1.5}
    write_results("tagging", figures)
    print(table(rows))
    print(f"{len(messages)} messages, {args.rounds} alternating rounds; building the {args.rules:,}-rule tagger "
          f"took {build_seconds:.1f}s")
    print(f"ratio {args.rules:,} rules / 10 rules: {ratio:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
