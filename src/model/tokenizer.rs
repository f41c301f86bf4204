//! Byte-level BPE tokenizer built from the GGUF's own metadata (no tokenizer.json
//! ships with the model): `tokenizer.ggml.tokens`, `.merges`, `.token_type`, and the
//! pre-tokenizer named by `tokenizer.ggml.pre`.
//!
//! The `tokenizers` crate does the BPE; what is ours is choosing the pre-tokenizer
//! that matches each model family's tokenizer.json, which candle's GGUF helper does
//! not do for SmolLM2 (it splits digits one by one).

use std::collections::BTreeSet;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// Qwen2's pre-tokenizer regex (from its tokenizer.json): like GPT-2's, with single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Llama 3's pre-tokenizer regex (`tokenizer.ggml.pre` llama-bpe): digits in
/// groups of up to three.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp's llama_token_type) that are not plain text.
const TOKEN_TYPE_CONTROL: u32 = 3;
const TOKEN_TYPE_USER_DEFINED: u32 = 4;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Tokens that end generation: the GGUF's eos plus the chat-turn terminators.
    eos_ids: Vec<u32>,
    bos: Option<(u32, String)>,
    eos: Option<(u32, String)>,
}

impl Tokenizer {
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = |key: &str| content.metadata.get(key);
        let kind = md("tokenizer.ggml.model")
            .context("GGUF metadata has no tokenizer.ggml.model")?
            .to_string()?;
        if kind != "gpt2" {
            bail!("tokenizer model `{kind}` is not supported (byte-level BPE `gpt2` is)");
        }
        let tokens = string_array(md("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens")?;
        let merges = string_array(md("tokenizer.ggml.merges"), "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| anyhow!("malformed merge `{m}` in tokenizer.ggml.merges"))
            })
            .collect::<Result<Vec<_>>>()?;
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let pre = md("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("default");
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            // Llama 3's tokenizer.json: a pre-token that is itself in the
            // vocabulary is one token, whatever the merges would make of it.
            .ignore_merges(pre == "llama-bpe")
            .build()
            .map_err(|e| anyhow!("cannot build BPE model: {e}"))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);

        let byte_level = ByteLevel::new(false, true, true);
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            // SmolLM2's tokenizer.json: digits split one by one, then GPT-2 byte level.
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            "qwen2" | "llama-bpe" => {
                // Qwen normalizes to NFC; Llama 3 does not normalize.
                let regex = match pre {
                    "qwen2" => {
                        inner
                            .with_normalizer(Some(NFC))
                            .map_err(|e| anyhow!("cannot set normalizer: {e}"))?;
                        QWEN2_SPLIT
                    }
                    _ => LLAMA3_SPLIT,
                };
                let split = Split::new(
                    SplitPattern::Regex(regex.to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| anyhow!("bad {pre} split regex: {e}"))?;
                Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, false, false).into(),
                ])
                .into()
            }
            _ => byte_level.into(),
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        // Control and user-defined tokens (<|im_start|>, ...) are matched whole in text,
        // so a rendered chat template tokenizes to the ids the model was trained on.
        if let Some(types) = md("tokenizer.ggml.token_type") {
            let types = types
                .to_vec()
                .context("tokenizer.ggml.token_type is not an array")?;
            let specials: Vec<AddedToken> = types
                .iter()
                .zip(&tokens)
                .filter(|(ty, _)| {
                    matches!(
                        numeric(ty),
                        Some(TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED)
                    )
                })
                .map(|(_, tok)| AddedToken::from(tok.clone(), true))
                .collect();
            inner
                .add_special_tokens(specials)
                .map_err(|e| anyhow!("{e}"))?;
        }

        let token_at = |key: &str| -> Option<(u32, String)> {
            let id = md(key).and_then(numeric)?;
            tokens.get(id as usize).map(|t| (id, t.clone()))
        };
        let bos = token_at("tokenizer.ggml.bos_token_id");
        let eos = token_at("tokenizer.ggml.eos_token_id");
        let mut eos_ids: BTreeSet<u32> = eos.iter().map(|(id, _)| *id).collect();
        for terminator in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>"] {
            if let Some(id) = inner.token_to_id(terminator) {
                eos_ids.insert(id);
            }
        }
        Ok(Self {
            inner,
            eos_ids: eos_ids.into_iter().collect(),
            bos,
            eos,
        })
    }

    /// The byte-level tokenizer of from-scratch models: ids 0..=255 are the
    /// bytes themselves (so a token id is the byte value), then the specials
    /// `<|endoftext|>` (256), `<|im_start|>` (257, bos) and `<|im_end|>` (258, eos)
    /// for the ChatML template. No merges: any text round-trips.
    pub fn bytes() -> Result<Self> {
        let vocab: tokenizers::models::bpe::Vocab = byte_alphabet()
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, Vec::new())
            .build()
            .map_err(|e| anyhow!("cannot build the byte tokenizer: {e}"))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = BYTE_SPECIALS
            .iter()
            .map(|t| AddedToken::from(*t, true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| anyhow!("{e}"))?;
        let id = |t: &str| -> Result<u32> {
            inner
                .token_to_id(t)
                .with_context(|| format!("byte tokenizer lost {t}"))
        };
        let (end, bos, eos) = (
            id(BYTE_SPECIALS[0])?,
            id(BYTE_SPECIALS[1])?,
            id(BYTE_SPECIALS[2])?,
        );
        anyhow::ensure!(
            end == 256,
            "byte tokenizer specials start at {end}, not 256"
        );
        Ok(Self {
            eos_ids: vec![end, eos],
            bos: Some((bos, BYTE_SPECIALS[1].to_string())),
            eos: Some((eos, BYTE_SPECIALS[2].to_string())),
            inner,
        })
    }

    /// Token ids of `text`, with special tokens such as `<|im_start|>` recognised.
    /// Adds no BOS: the chat template writes whatever the model expects.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| anyhow!("tokenizer failed: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Whether `text` has more than `limit` tokens, found without tokenising a
    /// huge text whole: encoding holds many times the text's size (a 4 MB body
    /// took ~1.5 GB), so a text longer than `limit` bytes (a token is at least
    /// one byte) is counted in pieces of about 64 KiB cut after whitespace, and
    /// the count stops once past `limit`. A cut can only merge or split tokens
    /// at its own boundary, so the pieces' total is within one token a cut of
    /// the true count; the answer is "more" only when the total minus that
    /// margin is past `limit`.
    pub fn exceeds(&self, text: &str, limit: usize) -> Result<bool> {
        const PIECE: usize = 64 * 1024;
        if text.len() <= limit {
            return Ok(false);
        }
        let (mut total, mut cuts, mut rest) = (0usize, 0usize, text);
        while !rest.is_empty() {
            let mut end = PIECE.min(rest.len());
            while !rest.is_char_boundary(end) {
                end += 1;
            }
            if end < rest.len() {
                if let Some(space) = rest[..end].rfind(char::is_whitespace) {
                    end = space.max(1);
                    while !rest.is_char_boundary(end) {
                        end += 1;
                    }
                }
                cuts += 1;
            }
            total += self.encode(&rest[..end])?.len();
            if total.saturating_sub(cuts) > limit {
                return Ok(true);
            }
            rest = &rest[end..];
        }
        Ok(false)
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow!("cannot decode token ids: {e}"))
    }

    /// The vocabulary entry of one id (special tokens included), for display.
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.binary_search(&id).is_ok()
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|(_, t)| t.as_str())
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_ref().map(|(_, t)| t.as_str())
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Specials of [`Tokenizer::bytes`], from id 256 on.
pub const BYTE_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// GPT-2's byte-to-unicode table (what the ByteLevel pre-tokenizer maps bytes
/// to), in byte order: entry b is the token of byte b.
pub(crate) fn byte_alphabet() -> Vec<String> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut extra = 0u32;
    (0u8..=255)
        .map(|b| {
            let c = if printable(b) {
                char::from(b)
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap_or('?')
            };
            c.to_string()
        })
        .collect()
}

/// Turns a growing list of generated ids into text pieces as they become printable:
/// a piece is released only once it no longer ends in a partial UTF-8 sequence.
pub struct StreamDecoder {
    /// Ids since the last released piece: only these are decoded again, so each
    /// token costs the same however long the reply gets. Byte-level BPE decodes
    /// by concatenating bytes, so decoding the tail alone gives the same text.
    pending: Vec<u32>,
    emitted: String,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self {
            pending: Vec::new(),
            emitted: String::new(),
        }
    }

    /// Adds one token; returns the newly printable text, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.pending.push(id);
        let piece = tokenizer.decode(&self.pending)?;
        if piece.ends_with('\u{FFFD}') {
            return Ok(None); // a multi-byte character is not complete yet
        }
        self.pending.clear();
        self.emitted.push_str(&piece);
        Ok((!piece.is_empty()).then_some(piece))
    }

    /// Everything decoded so far.
    pub fn text(&self) -> &str {
        &self.emitted
    }
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

fn numeric(v: &Value) -> Option<u32> {
    match v {
        Value::U8(v) => Some(u32::from(*v)),
        Value::I8(v) => u32::try_from(*v).ok(),
        Value::U16(v) => Some(u32::from(*v)),
        Value::I16(v) => u32::try_from(*v).ok(),
        Value::U32(v) => Some(*v),
        Value::I32(v) => u32::try_from(*v).ok(),
        Value::U64(v) => u32::try_from(*v).ok(),
        Value::I64(v) => u32::try_from(*v).ok(),
        _ => None,
    }
}

fn string_array(value: Option<&Value>, key: &str) -> Result<Vec<String>> {
    let values = value
        .with_context(|| format!("GGUF metadata has no {key}"))?
        .to_vec()
        .with_context(|| format!("{key} is not an array"))?;
    values
        .iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|_| anyhow!("{key} holds a non-string entry"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF header with the tiny vocabulary plus `extra` tokens and the
    /// pre-tokenizer `pre`.
    fn tokenizer_with(pre: &str, extra: &[&str]) -> Tokenizer {
        let mut vocab = crate::model::testing::tiny_vocab();
        vocab.extend(extra.iter().map(|t| t.to_string()));
        let md = [
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String(pre.into())),
            (
                "tokenizer.ggml.tokens",
                Value::Array(vocab.into_iter().map(Value::String).collect()),
            ),
            ("tokenizer.ggml.merges", Value::Array(Vec::new())),
        ];
        let refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let mut bytes = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut bytes, &refs, &[]).unwrap();
        bytes.set_position(0);
        Tokenizer::from_gguf(&gguf_file::Content::read(&mut bytes).unwrap()).unwrap()
    }

    #[test]
    fn llama3_groups_digits_by_three_and_takes_whole_words_from_the_vocabulary() {
        let llama3 = tokenizer_with("llama-bpe", &["123", "Ġworld"]);
        let pieces = |t: &Tokenizer, text: &str| -> Vec<String> {
            let ids = t.encode(text).unwrap();
            ids.iter().map(|&id| t.decode(&[id]).unwrap()).collect()
        };
        // "12345" is the pre-tokens "123" and "45"; "123" is in the vocabulary,
        // and so is " world", though no merge makes it.
        assert_eq!(pieces(&llama3, "12345 world"), ["123", "4", "5", " world"]);
        // GPT-2's default keeps the digits together and applies merges only.
        let gpt2 = tokenizer_with("default", &["123", "Ġworld"]);
        assert_eq!(pieces(&gpt2, "12345").len(), 5);
    }

    #[test]
    fn a_huge_text_is_found_over_the_limit_in_pieces() {
        for t in [
            Tokenizer::bytes().unwrap(),
            tokenizer_with("llama-bpe", &["123", "Ġworld"]),
        ] {
            // ~300 kB: several 64 KiB pieces, cut after whitespace, multi-byte text.
            let text = "héllo wörld 123 ☃\n".repeat(15_000);
            let n = t.encode(&text).unwrap().len();
            let cuts = text.len() / (64 * 1024) + 1;
            assert!(t.exceeds(&text, n / 2).unwrap());
            assert!(t.exceeds(&text, n - cuts - 1).unwrap());
            assert!(!t.exceeds(&text, n).unwrap(), "never more than it has");
            assert!(!t.exceeds(&text, n + 10).unwrap());
            assert!(
                !t.exceeds("short", 5).unwrap(),
                "5 bytes cannot be 6 tokens"
            );
            let short = t.encode("short").unwrap().len();
            assert_eq!(t.exceeds("short", 4).unwrap(), short > 4);
        }
    }

    #[test]
    fn byte_tokenizer_ids_are_bytes_and_round_trip() {
        let t = Tokenizer::bytes().unwrap();
        let text = "Héllo, wörld!\n\t1 2  3 ☃";
        let ids = t.encode(text).unwrap();
        let bytes: Vec<u32> = text.bytes().map(u32::from).collect();
        assert_eq!(ids, bytes);
        assert_eq!(t.decode(&ids).unwrap(), text);
        assert_eq!(t.vocab_size(), 259);
        let chat = t.encode("<|im_start|>user\nhi<|im_end|>").unwrap();
        assert_eq!(chat[0], 257);
        assert_eq!(*chat.last().unwrap(), 258);
        assert!(t.is_eos(258) && t.is_eos(256) && !t.is_eos(b'a' as u32));
        assert_eq!(t.bos_token(), Some("<|im_start|>"));
    }
}
