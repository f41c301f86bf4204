//! Tool calls in the model's output: Qwen/Hermes-style `<tool_call>{json}</tool_call>`
//! blocks (what Qwen2.5's and Hermes' chat templates teach the model to write),
//! turned into OpenAI `tool_calls`. A reply that is nothing but one such JSON
//! object (bare, or in a ``` fence) naming a tool the request offered is a call
//! too: small models (Qwen2.5-Coder-0.5B) write their calls that way, and
//! llama.cpp's server accepts them too.

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
/// its JSON is complete. Without any block, a whole reply that is a call of one
/// of `offered` (tool names) is that call.
pub fn parse_tool_calls(
    text: &str,
    offered: &[String],
    mut new_id: impl FnMut() -> String,
) -> (String, Vec<ToolCall>) {
    if !text.contains(OPEN) {
        return match bare_call(text, offered) {
            Some((name, arguments)) => (
                String::new(),
                vec![ToolCall {
                    id: new_id(),
                    name,
                    arguments,
                }],
            ),
            None => (text.to_string(), Vec::new()),
        };
    }
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

/// The call a whole reply makes without `<tool_call>` markup: one JSON object
/// (optionally in a ``` or ```json fence) whose `name` is an offered tool and
/// whose `arguments` (or `parameters`) is present. Anything else is not a call:
/// a JSON answer that names no offered tool stays content.
fn bare_call(text: &str, offered: &[String]) -> Option<(String, String)> {
    let mut body = text.trim();
    if let Some(fenced) = body.strip_prefix("```") {
        let fenced = fenced.strip_prefix("json").unwrap_or(fenced);
        body = fenced.strip_suffix("```")?.trim();
    }
    if !body.starts_with('{') {
        return None;
    }
    let value = call_object(body)?;
    value.get("arguments").or_else(|| value.get("parameters"))?;
    let (name, arguments) = call_parts(&value)?;
    offered.contains(&name).then_some((name, arguments))
}

/// The JSON object a call's text holds. Stray closing braces after it are
/// forgiven: small models overshoot a nested object's end (Qwen2.5-0.5B writes
/// `{"name": "python", "arguments": {"code": "..."}}}}`), and the call is still
/// unambiguous. Anything else after the object makes it no call.
fn call_object(text: &str) -> Option<Json> {
    let mut values = serde_json::Deserializer::from_str(text.trim()).into_iter::<Json>();
    let value = values.next()?.ok()?;
    let rest = &text.trim()[values.byte_offset()..];
    (value.is_object() && rest.chars().all(|c| c == '}' || c.is_whitespace())).then_some(value)
}

fn parse_one(inner: &str) -> Option<(String, String)> {
    call_parts(&call_object(inner)?)
}

/// A call object's name and its arguments as a JSON string.
fn call_parts(value: &Json) -> Option<(String, String)> {
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
/// as content; [`finish`](Self::finish) parses what was held. A reply that
/// opens like a bare JSON call (`{` or a fence) is held whole until the end.
pub struct ToolStreamFilter {
    held: String,
    in_call: bool,
    /// Nothing has been sent yet and the reply so far could be a bare call.
    maybe_bare: bool,
    offered: Vec<String>,
}

impl ToolStreamFilter {
    /// A filter for a reply to a request that offered the tools `offered`.
    pub fn new(offered: Vec<String>) -> Self {
        Self {
            held: String::new(),
            in_call: false,
            maybe_bare: true,
            offered,
        }
    }

    /// Returns the text that is safe to send as content now.
    pub fn push(&mut self, piece: &str) -> String {
        self.held.push_str(piece);
        if self.in_call {
            return String::new();
        }
        if self.maybe_bare {
            let start = self.held.trim_start();
            let could_be = start.is_empty()
                || start.starts_with('{')
                || "```".starts_with(start)
                || start.starts_with("```");
            if could_be && !self.held.contains(OPEN) {
                return String::new();
            }
            self.maybe_bare = false;
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
        if !self.in_call && !self.maybe_bare {
            return (self.held, Vec::new());
        }
        parse_tool_calls(&self.held, &self.offered, new_id)
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
        let (content, calls) = parse_tool_calls(text, &[], ids());
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
        let (content, calls) = parse_tool_calls(text, &[], ids());
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
        let (content, calls) = parse_tool_calls(text, &[], ids());
        assert!(calls.is_empty());
        assert_eq!(content, text);
    }

    #[test]
    fn stream_filter_holds_markup_back() {
        let mut f = ToolStreamFilter::new(Vec::new());
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

    fn offered() -> Vec<String> {
        vec!["python".to_string()]
    }

    #[test]
    fn a_bare_call_of_an_offered_tool_is_a_call() {
        let bare = "{\"name\": \"python\", \"arguments\": {\"code\": \"print(1)\"}}";
        let fenced = format!("```json\n{bare}\n```");
        // A small model's stray closing braces after the object are forgiven,
        // in a bare call and in a <tool_call> block.
        let overshot = format!("{bare}}}}}");
        let tagged = format!("<tool_call>\n{bare}}}\n</tool_call>");
        for text in [
            bare.to_string(),
            format!("  {bare}\n"),
            fenced,
            overshot,
            tagged,
        ] {
            let (content, calls) = parse_tool_calls(&text, &offered(), ids());
            assert_eq!(content, "", "{text}");
            assert_eq!(calls.len(), 1, "{text}");
            assert_eq!(calls[0].name, "python");
            assert_eq!(calls[0].arguments, "{\"code\":\"print(1)\"}");
        }
    }

    #[test]
    fn json_that_is_not_an_offered_call_stays_content() {
        for text in [
            // A tool nobody offered, an answer that is JSON, text around the object.
            "{\"name\": \"shell\", \"arguments\": {\"cmd\": \"ls\"}}",
            "{\"name\": \"python\"}",
            "{\"answer\": 42}",
            "Here: {\"name\": \"python\", \"arguments\": {}}",
            // Anything but closing braces after the object.
            "{\"name\": \"python\", \"arguments\": {}} and then some",
            "{\"name\": \"python\", \"arguments\": {}}]",
        ] {
            let (content, calls) = parse_tool_calls(text, &offered(), ids());
            assert!(calls.is_empty(), "{text}");
            assert_eq!(content, text);
        }
        let bare = "{\"name\": \"python\", \"arguments\": {}}";
        assert!(
            parse_tool_calls(bare, &[], ids()).1.is_empty(),
            "no tools offered"
        );
    }

    #[test]
    fn stream_filter_holds_a_bare_call_and_releases_plain_json() {
        let mut f = ToolStreamFilter::new(offered());
        let mut out = String::new();
        for piece in [
            "{\"name\": ",
            "\"python\", \"arguments\": ",
            "{\"code\": \"1\"}}",
        ] {
            out.push_str(&f.push(piece));
        }
        assert_eq!(out, "");
        let (rest, calls) = f.finish(ids());
        assert_eq!((rest.as_str(), calls.len()), ("", 1));

        let mut f = ToolStreamFilter::new(offered());
        let mut out = f.push("{\"answer\"");
        out.push_str(&f.push(": 42}"));
        let (rest, calls) = f.finish(ids());
        out.push_str(&rest);
        assert_eq!(out, "{\"answer\": 42}");
        assert!(calls.is_empty());

        // Plain text is not held: it streams from the first piece.
        let mut f = ToolStreamFilter::new(offered());
        assert_eq!(f.push("Hello"), "Hello");
    }

    #[test]
    fn stream_filter_releases_lookalikes() {
        let mut f = ToolStreamFilter::new(Vec::new());
        let mut out = f.push("a <to");
        out.push_str(&f.push("ol> b"));
        let (rest, calls) = f.finish(ids());
        out.push_str(&rest);
        assert_eq!(out, "a <tool> b");
        assert!(calls.is_empty());
    }
}
