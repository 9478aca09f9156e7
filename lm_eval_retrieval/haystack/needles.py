"""Needles: one invented fact per document, with the question that retrieves it and the span a model must copy.

The facts are written for this project and cannot be guessed or known from pre-training, so a correct answer can
only come from reading the context; that is what makes the heads that copy it "retrieval" heads. `answer` is an
exact substring of `needle` because the retrieval score counts decode steps whose top-1 attention lands inside the
answer span of the prompt.

Every built-in needle also carries its gold answer in the other supported languages (`translations`), for
"translation" heads: the model reads the needle in one language and is told to answer in another, and ROUGE grades
the answer against the gold answer of the answer language. The German and Chinese needles are written natively
(German names and places, Chinese names and full-width punctuation), not translated word for word.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.haystack.languages import LANGUAGES


@dataclass(frozen=True)
class Needle:
    """An inserted sentence (`needle`), the question about it, and the answer span inside the sentence.

    `translations` maps another language to the gold answer in that language (`{"zh": ..., "de": ...}`).
    """

    needle: str
    question: str
    answer: str
    language: str = "en"
    translations: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # Validated here so a user's own needle fails at construction, not deep inside scoring.
        for name in ("needle", "question", "answer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise UserInputError(f"Needle.{name} must be a non-empty string; got {value!r}")
            if "\n" in value or "\r" in value:
                raise UserInputError(f"Needle.{name} must be one line; remove the newline from {value!r}")
        if self.answer not in self.needle:
            raise UserInputError(
                f"Needle.answer {self.answer!r} must be an exact substring of the needle sentence {self.needle!r}"
            )
        if not isinstance(self.translations, Mapping):
            raise UserInputError(f"Needle.translations must map a language to an answer; got {self.translations!r}")
        for code, text in self.translations.items():
            if not isinstance(text, str) or not text.strip() or "\n" in text:
                raise UserInputError(f"Needle.translations[{code!r}] must be a one-line answer; got {text!r}")
        object.__setattr__(self, "translations", dict(self.translations))  # a private copy

    def answer_in(self, language: str) -> str:
        """The gold answer in `language`: the span itself in the needle's language, else its translation."""
        if language == self.language:
            return self.answer
        try:
            return self.translations[language]
        except KeyError:
            have = ", ".join([self.language, *sorted(self.translations)])
            raise UserInputError(
                f"needle {self.needle[:40]!r}... has no gold answer in {language!r}; answer languages it supports: {have}"
            ) from None


NEEDLES: dict[str, list[Needle]] = {
    "en": [
        Needle(
            "The secret ingredient in Marta Kowalski's apple pie is a spoonful of smoked paprika.",
            "What is the secret ingredient in Marta Kowalski's apple pie?",
            "a spoonful of smoked paprika",
            translations={"zh": "一勺烟熏辣椒粉", "de": "ein Löffel geräuchertes Paprikapulver"},
        ),
        Needle(
            "The lighthouse keeper on Brannock Island keeps his spare keys inside a hollow brass owl.",
            "Where does the lighthouse keeper on Brannock Island keep his spare keys?",
            "inside a hollow brass owl",
            translations={"zh": "在一只空心的黄铜猫头鹰里", "de": "in einer hohlen Messingeule"},
        ),
        Needle(
            "The password for the back door of the Elmsworth chess club is purple walrus seventeen.",
            "What is the password for the back door of the Elmsworth chess club?",
            "purple walrus seventeen",
            translations={"zh": "紫色海象十七", "de": "lila Walross siebzehn"},
        ),
        Needle(
            "Every rainy Sunday, Ines Okafor spends the afternoon repairing antique cuckoo clocks.",
            "What does Ines Okafor spend the afternoon doing every rainy Sunday?",
            "repairing antique cuckoo clocks",
            translations={"zh": "修理古董布谷鸟钟", "de": "antike Kuckucksuhren reparieren"},
        ),
        Needle(
            "The first prize at the Lower Haddon turnip festival was a copper kettle shaped like a swan.",
            "What was the first prize at the Lower Haddon turnip festival?",
            "a copper kettle shaped like a swan",
            translations={"zh": "一把天鹅形状的铜水壶", "de": "ein kupferner Wasserkessel in Form eines Schwans"},
        ),
        Needle(
            "Captain Yusuf Demir hid the last map of the expedition inside a tin of peppermint tea.",
            "Where did Captain Yusuf Demir hide the last map of the expedition?",
            "inside a tin of peppermint tea",
            translations={"zh": "在一罐薄荷茶里", "de": "in einer Dose Pfefferminztee"},
        ),
        Needle(
            "The old sailboat of the Vasquez family is painted bright orange with green stripes.",
            "How is the old sailboat of the Vasquez family painted?",
            "bright orange with green stripes",
            translations={"zh": "带绿色条纹的亮橙色", "de": "leuchtend orange mit grünen Streifen"},
        ),
        Needle(
            "On her seventieth birthday, Greta Lindqvist started learning to play the bagpipes.",
            "What did Greta Lindqvist start learning on her seventieth birthday?",
            "to play the bagpipes",
            translations={"zh": "吹风笛", "de": "Dudelsack spielen"},
        ),
    ],
    "zh": [
        Needle(
            "王秀兰做苹果派的秘方是加一勺烟熏辣椒粉。",
            "王秀兰做苹果派的秘方是什么？",
            "加一勺烟熏辣椒粉",
            "zh",
            translations={"en": "adding a spoonful of smoked chili powder",
                          "de": "einen Löffel geräuchertes Chilipulver hinzufügen"},
        ),
        Needle(
            "青石岛灯塔的看守人把备用钥匙藏在一只空心的铜猫头鹰里。",
            "青石岛灯塔的看守人把备用钥匙藏在哪里？",
            "一只空心的铜猫头鹰里",
            "zh",
            translations={"en": "inside a hollow copper owl", "de": "in einer hohlen Kupfereule"},
        ),
        Needle(
            "柳河镇象棋俱乐部后门的暗号是紫色海象十七。",
            "柳河镇象棋俱乐部后门的暗号是什么？",
            "紫色海象十七",
            "zh",
            translations={"en": "purple walrus seventeen", "de": "lila Walross siebzehn"},
        ),
        Needle(
            "每逢下雨的星期天，陈国栋都会花一下午修理老式座钟。",
            "每逢下雨的星期天，陈国栋会花一下午做什么？",
            "修理老式座钟",
            "zh",
            translations={"en": "repairing old mantel clocks", "de": "alte Kaminuhren reparieren"},
        ),
        Needle(
            "东坝村萝卜节的头奖是一把天鹅形状的铜水壶。",
            "东坝村萝卜节的头奖是什么？",
            "一把天鹅形状的铜水壶",
            "zh",
            translations={"en": "a swan-shaped copper kettle", "de": "ein kupferner Wasserkessel in Form eines Schwans"},
        ),
        Needle(
            "赵海峰船长把探险队的最后一张地图藏在了一罐薄荷茶里。",
            "赵海峰船长把探险队的最后一张地图藏在了哪里？",
            "一罐薄荷茶里",
            "zh",
            translations={"en": "in a tin of peppermint tea", "de": "in einer Dose Pfefferminztee"},
        ),
        Needle(
            "刘家的那条旧帆船被漆成了带绿色条纹的亮橙色。",
            "刘家的那条旧帆船被漆成了什么颜色？",
            "带绿色条纹的亮橙色",
            "zh",
            translations={"en": "bright orange with green stripes", "de": "leuchtend orange mit grünen Streifen"},
        ),
        Needle(
            "林美玲七十岁生日那天开始学吹唢呐。",
            "林美玲七十岁生日那天开始学什么？",
            "吹唢呐",
            "zh",
            translations={"en": "playing the suona", "de": "Suona spielen"},
        ),
    ],
    "de": [
        Needle(
            "Jürgen Weißmüller versteckt den Ersatzschlüssel seiner Gartenlaube in einer leeren Gießkanne.",
            "Wo versteckt Jürgen Weißmüller den Ersatzschlüssel seiner Gartenlaube?",
            "in einer leeren Gießkanne",
            "de",
            translations={"en": "in an empty watering can", "zh": "在一个空浇水壶里"},
        ),
        Needle(
            "Der erste Preis beim Kürbisfest in Bad Tölz war eine kupferne Kaffeekanne in Form einer Ente.",
            "Was war der erste Preis beim Kürbisfest in Bad Tölz?",
            "eine kupferne Kaffeekanne in Form einer Ente",
            "de",
            translations={"en": "a copper coffee pot shaped like a duck", "zh": "一个鸭子形状的铜咖啡壶"},
        ),
        Needle(
            "Das Passwort für die Hintertür des Schachvereins in Überlingen lautet grüner Fuchs achtzehn.",
            "Wie lautet das Passwort für die Hintertür des Schachvereins in Überlingen?",
            "grüner Fuchs achtzehn",
            "de",
            translations={"en": "green fox eighteen", "zh": "绿狐狸十八"},
        ),
        Needle(
            "An jedem verregneten Sonntag repariert Hannelore Brückner alte Kuckucksuhren aus dem Schwarzwald.",
            "Was repariert Hannelore Brückner an jedem verregneten Sonntag?",
            "alte Kuckucksuhren aus dem Schwarzwald",
            "de",
            translations={"en": "old cuckoo clocks from the Black Forest", "zh": "黑森林的老式布谷鸟钟"},
        ),
        Needle(
            "Das alte Segelboot der Familie Strößner ist leuchtend gelb mit blauen Streifen gestrichen.",
            "Wie ist das alte Segelboot der Familie Strößner gestrichen?",
            "leuchtend gelb mit blauen Streifen",
            "de",
            translations={"en": "bright yellow with blue stripes", "zh": "带蓝色条纹的亮黄色"},
        ),
        Needle(
            "Zu ihrem siebzigsten Geburtstag schenkte sich Ursula Köhler ein Alphorn aus Fichtenholz.",
            "Was schenkte sich Ursula Köhler zu ihrem siebzigsten Geburtstag?",
            "ein Alphorn aus Fichtenholz",
            "de",
            translations={"en": "an alphorn made of spruce wood", "zh": "一支云杉木做的阿尔卑斯长号"},
        ),
        Needle(
            "Kapitän Friedrich Straßburger versteckte die letzte Karte der Expedition in einer Dose Pfefferminztee.",
            "Wo versteckte Kapitän Friedrich Straßburger die letzte Karte der Expedition?",
            "in einer Dose Pfefferminztee",
            "de",
            translations={"en": "in a tin of peppermint tea", "zh": "在一罐薄荷茶里"},
        ),
        Needle(
            "Die Bäckerei am Marktplatz von Quedlinburg verkauft samstags Brezeln mit Kürbiskernen und Honig.",
            "Was verkauft die Bäckerei am Marktplatz von Quedlinburg samstags?",
            "Brezeln mit Kürbiskernen und Honig",
            "de",
            translations={"en": "pretzels with pumpkin seeds and honey", "zh": "撒了南瓜子、抹了蜂蜜的椒盐卷饼"},
        ),
    ],
}


def get_needles(language: str = "en") -> list[Needle]:
    """The built-in needles of `language` (a fresh list, so callers may shuffle or extend it)."""
    try:
        return list(NEEDLES[language])
    except (KeyError, TypeError):
        known = ", ".join(LANGUAGES)
        raise UserInputError(f"no needles for language {language!r}; use one of: {known}") from None
