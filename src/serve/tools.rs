//! Tool calls in the model's output: Qwen/Hermes-style `<tool_call>{json}</tool_call>`
//! blocks (what Qwen2.5's and Hermes' chat templates teach the model to write),
//! turned into OpenAI `tool_calls`.

use serde_json::{json, Value as Json};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// One parsed call: the function name and its arguments as a JSON string (OpenAI
/// sends `arguments` as a string).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

impl ToolCall {
    /// The OpenAI shape inside `message.tool_calls`.
    pub fn to_json(&self) -> Json {
        json!({
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        })
    }

    /// The OpenAI shape inside a streamed `delta.tool_calls`.
    pub fn to_delta_json(&self, index: usize) -> Json {
        json!({
            "index": index,
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        })
    }
}

/// Splits `text` into the plain content and the tool calls it holds (with no
/// call, the content is `text` unchanged; with calls, it is trimmed). Blocks whose
/// JSON does not parse (or has no `name`) stay in the content as written, so a
/// malformed call is visible to the client rather than silently dropped. An
/// unterminated final `<tool_call>` (generation cut by max_tokens) is parsed if
/// its JSON is complete.
pub fn parse_tool_calls(text: &str, mut new_id: impl FnMut() -> String) -> (String, Vec<ToolCall>) {
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        content.push_str(&rest[..start]);
        let after = &rest[start + OPEN.len()..];
        let (inner, next, whole_len) = match after.find(CLOSE) {
            Some(end) => (
                &after[..end],
                &after[end + CLOSE.len()..],
                OPEN.len() + end + CLOSE.len(),
            ),
            None => (after, "", rest.len() - start),
        };
        match parse_one(inner) {
            Some((name, arguments)) => calls.push(ToolCall {
                id: new_id(),
                name,
                arguments,
            }),
            None => content.push_str(&rest[start..start + whole_len]),
        }
        rest = next;
    }
    if calls.is_empty() {
        return (text.to_string(), calls);
    }
    content.push_str(rest);
    (content.trim().to_string(), calls)
}

fn parse_one(inner: &str) -> Option<(String, String)> {
    let value: Json = serde_json::from_str(inner.trim()).ok()?;
    let name = value.get("name")?.as_str()?.to_string();
    let arguments = match value.get("arguments").or_else(|| value.get("parameters")) {
        None | Some(Json::Null) => "{}".to_string(),
        Some(Json::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    Some((name, arguments))
}

/// For streaming with tools: passes text through until a `<tool_call>` may be
/// starting, then holds everything back so the markup never reaches the client
/// as content; [`finish`](Self::finish) parses what was held.
#[derive(Default)]
pub struct ToolStreamFilter {
    held: String,
    in_call: bool,
}

impl ToolStreamFilter {
    /// Returns the text that is safe to send as content now.
    pub fn push(&mut self, piece: &str) -> String {
        self.held.push_str(piece);
        if self.in_call {
            return String::new();
        }
        if let Some(pos) = self.held.find(OPEN) {
            self.in_call = true;
            let out = self.held[..pos].to_string();
            self.held.drain(..pos);
            return out;
        }
        // Hold back a suffix that could be the start of `<tool_call>`.
        let keep = (1..OPEN.len())
            .rev()
            .find(|&n| {
                self.held.len() >= n
                    && self.held.is_char_boundary(self.held.len() - n)
                    && OPEN.starts_with(&self.held[self.held.len() - n..])
            })
            .unwrap_or(0);
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        out
    }

    /// The remaining content to send and the parsed calls.
    pub fn finish(self, new_id: impl FnMut() -> String) -> (String, Vec<ToolCall>) {
        if !self.in_call {
            return (self.held, Vec::new());
        }
        let (content, calls) = parse_tool_calls(&self.held, new_id);
        (content, calls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("call_{n}")
        }
    }

    #[test]
    fn parses_hermes_blocks() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let (content, calls) = parse_tool_calls(text, ids());
        assert_eq!(content, "Let me check.");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].id, "call_1");
        let args: Json = serde_json::from_str(&calls[0].arguments).unwrap();
        assert_eq!(args, json!({"city": "Paris"}));
    }

    #[test]
    fn parses_several_and_unterminated() {
        let text = "<tool_call>{\"name\":\"a\",\"arguments\":{}}</tool_call><tool_call>{\"name\":\"b\",\"arguments\":\"{\\\"x\\\":1}\"}";
        let (content, calls) = parse_tool_calls(text, ids());
        assert_eq!(content, "");
        assert_eq!(
            calls.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(calls[1].arguments, "{\"x\":1}");
    }

    #[test]
    fn malformed_block_stays_text() {
        let text = "hi <tool_call>{not json}</tool_call> there";
        let (content, calls) = parse_tool_calls(text, ids());
        assert!(calls.is_empty());
        assert_eq!(content, text);
    }

    #[test]
    fn stream_filter_holds_markup_back() {
        let mut f = ToolStreamFilter::default();
        let mut out = String::new();
        for piece in [
            "Sure",
            ". <tool",
            "_call>{\"name\": \"f\", ",
            "\"arguments\": {}}</tool_call>",
        ] {
            out.push_str(&f.push(piece));
        }
        assert_eq!(out, "Sure. ");
        let (rest, calls) = f.finish(ids());
        assert_eq!(rest, "");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "f");
    }

    #[test]
    fn stream_filter_releases_lookalikes() {
        let mut f = ToolStreamFilter::default();
        let mut out = f.push("a <to");
        out.push_str(&f.push("ol> b"));
        let (rest, calls) = f.finish(ids());
        out.push_str(&rest);
        assert_eq!(out, "a <tool> b");
        assert!(calls.is_empty());
    }
}
