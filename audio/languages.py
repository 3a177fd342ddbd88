"""Whisper's language codes and names, and the lookup of a request's `language` (any process)."""

from __future__ import annotations

LANGUAGES: dict[str, str] = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian", "ko":
    "korean", "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish", "pl":
    "polish", "ca": "catalan", "nl": "dutch", "ar": "arabic", "sv": "swedish", "it": "italian",
    "id": "indonesian", "hi": "hindi", "fi": "finnish", "vi": "vietnamese", "he": "hebrew",
    "uk": "ukrainian", "el": "greek", "ms": "malay", "cs": "czech", "ro": "romanian", "da":
    "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian", "th": "thai", "ur": "urdu",
    "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian", "la": "latin", "mi": "maori", "ml":
    "malayalam", "cy": "welsh", "sk": "slovak", "te": "telugu", "fa": "persian", "lv":
    "latvian", "bn": "bengali", "sr": "serbian", "az": "azerbaijani", "sl": "slovenian", "kn":
    "kannada", "et": "estonian", "mk": "macedonian", "br": "breton", "eu": "basque", "is":
    "icelandic", "hy": "armenian", "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk":
    "kazakh", "sq": "albanian", "sw": "swahili", "gl": "galician", "mr": "marathi", "pa":
    "punjabi", "si": "sinhala", "km": "khmer", "sn": "shona", "yo": "yoruba", "so": "somali",
    "af": "afrikaans", "oc": "occitan", "ka": "georgian", "be": "belarusian", "tg": "tajik",
    "sd": "sindhi", "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao", "uz":
    "uzbek", "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn":
    "nynorsk", "mt": "maltese", "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo":
    "tibetan", "tl": "tagalog", "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw":
    "hawaiian", "ln": "lingala", "ha": "hausa", "ba": "bashkir", "jw": "javanese", "su":
    "sundanese", "yue": "cantonese"
}
_NAME_ALIASES: dict[str, str] = {
    "burmese": "my", "valencian": "ca", "flemish": "nl", "haitian": "ht", "letzeburgesch": "lb",
    "pushto": "ps", "panjabi": "pa", "moldavian": "ro", "moldovan": "ro", "sinhalese": "si",
    "castilian": "es", "mandarin": "zh"
}
TO_LANGUAGE_CODE: dict[str, str] = {**{name: code for code, name in LANGUAGES.items()}, **_NAME_ALIASES}
# scripts without spaces between words: word timing splits them per character
NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})


def language_code(value: str) -> str | None:
    """'de', 'DE', 'German', 'de-DE' -> 'de'; None when it is no Whisper language."""
    key = value.strip().lower().replace("_", "-")
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[key]
    base = key.split("-")[0]
    return base if base in LANGUAGES else None
