//! The model's chat template (`tokenizer.chat_template` in the GGUF), rendered with
//! minijinja the way Hugging Face's `apply_chat_template` does: `trim_blocks` and
//! `lstrip_blocks` on, Python string methods available, `raise_exception` defined,
//! and `tojson` as Python's `json.dumps` writes it (see [`py_json`]).

use anyhow::{anyhow, Context, Result};
use candle_core::quantized::gguf_file;
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use serde_json::Value as Json;

use super::tokenizer::Tokenizer;

/// Used when a GGUF carries no template: plain ChatML, what SmolLM2 and Qwen2 speak.
const CHATML_FALLBACK: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat";

pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    pub fn from_gguf(content: &gguf_file::Content, tokenizer: &Tokenizer) -> Result<Self> {
        let source = match content.metadata.get("tokenizer.chat_template") {
            Some(v) => v
                .to_string()
                .context("tokenizer.chat_template is not a string")?
                .clone(),
            None => {
                crate::warn!("the model has no chat template; using ChatML");
                CHATML_FALLBACK.to_string()
            }
        };
        Self::new(
            &source,
            tokenizer.bos_token().unwrap_or(""),
            tokenizer.eos_token().unwrap_or(""),
        )
    }

    /// Plain ChatML with the tokenizer's bos/eos (byte-level from-scratch models).
    pub fn chatml(tokenizer: &Tokenizer) -> Result<Self> {
        Self::new(
            CHATML_FALLBACK,
            tokenizer.bos_token().unwrap_or(""),
            tokenizer.eos_token().unwrap_or(""),
        )
    }

    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| anyhow!("the chat template does not parse: {e:#}"))?;
        Ok(Self {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Renders OpenAI-style `messages` (and optional `tools`) into the prompt text.
    /// With `add_generation_prompt` the text ends where the assistant's reply begins.
    pub fn render(
        &self,
        messages: &[Json],
        tools: Option<&[Json]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| anyhow!("{e}"))?;
        let ctx = minijinja::context! {
            messages => messages,
            tools => tools.filter(|t| !t.is_empty()),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        template
            .render(ctx)
            .map_err(|e| anyhow!("cannot render the chat template: {e:#}"))
    }

    /// Whether the template itself renders `tools`; if not, a caller that has tools
    /// must describe them some other way (for example in the system message).
    pub fn supports_tools(&self) -> bool {
        self.source.contains("tools")
    }

    pub fn source(&self) -> &str {
        &self.source
    }
}

/// Hugging Face's `tojson`: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`. minijinja's own filter writes compact JSON
/// with sorted keys and `<>&'` escaped, which is not the text the model was trained
/// on: tool schemas and tool call arguments (rendered by Qwen2.5's and Hermes'
/// templates) would read differently from what the model itself writes.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent = match indent.or(kwargs.get::<Option<Value>>("indent")?) {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => Some(" ".repeat(usize::try_from(v)?)),
        },
    };
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair (item, key)",
            ))
        }
        // Python's defaults: no space before a newline when indenting.
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let json = serde_json::to_value(value).map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: cannot serialize")
            .with_source(e)
    })?;
    let style = PyJson {
        indent,
        item,
        key,
        sort_keys,
        ensure_ascii,
    };
    let mut out = String::new();
    style.write(&json, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

/// How Python's `json.dumps` lays JSON out (the options `tojson` takes).
struct PyJson {
    indent: Option<String>,
    item: String,
    key: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl PyJson {
    fn write(&self, v: &Json, level: usize, out: &mut String) {
        match v {
            Json::Array(items) if !items.is_empty() => {
                out.push('[');
                for (i, x) in items.iter().enumerate() {
                    self.separate(i == 0, level + 1, out);
                    self.write(x, level + 1, out);
                }
                self.close(level, out);
                out.push(']');
            }
            Json::Object(map) if !map.is_empty() => {
                let mut entries: Vec<(&String, &Json)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, x)) in entries.into_iter().enumerate() {
                    self.separate(i == 0, level + 1, out);
                    self.string(k, out);
                    out.push_str(&self.key);
                    self.write(x, level + 1, out);
                }
                self.close(level, out);
                out.push('}');
            }
            Json::String(s) => self.string(s, out),
            other => out.push_str(&other.to_string()),
        }
    }

    fn separate(&self, first: bool, level: usize, out: &mut String) {
        if !first {
            out.push_str(&self.item);
        }
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(level));
        }
    }

    fn close(&self, level: usize, out: &mut String) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(level));
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        // serde_json escapes what Python escapes with ensure_ascii=False: quote,
        // backslash and control characters (\n \r \t \b \f, else \u00XX).
        let quoted = Json::String(s.to_string()).to_string();
        if !self.ensure_ascii {
            out.push_str(&quoted);
            return;
        }
        for c in quoted.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_smollm2_template_with_default_system_prompt() {
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        let out = t
            .render(&[json!({"role": "user", "content": "Hi"})], None, true)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let no_gen = t
            .render(
                &[
                    json!({"role": "system", "content": "S"}),
                    json!({"role": "user", "content": "Hi"}),
                ],
                None,
                false,
            )
            .unwrap();
        assert_eq!(
            no_gen,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn renders_tools_and_python_methods_like_hf() {
        // The shape of Qwen2.5's template: tools as JSON, `.strip()`, trim/lstrip blocks.
        let src = "{%- if tools %}\n<tools>\n{%- for tool in tools %}\n{{ tool | tojson }}\n{%- endfor %}\n</tools>\n{%- endif %}\n{%- for m in messages %}\n{{ m.role }}: {{ m.content.strip() }}\n{%- endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let tools = [json!({"type": "function", "function": {"name": "ls"}})];
        let out = t
            .render(
                &[json!({"role": "user", "content": "  hi  "})],
                Some(&tools),
                true,
            )
            .unwrap();
        assert!(
            out.contains(r#"{"type": "function", "function": {"name": "ls"}}"#),
            "{out}"
        );
        assert!(out.contains("user: hi"), "{out}");
        assert!(t.supports_tools());
    }

    #[test]
    fn tojson_writes_what_pythons_json_dumps_writes() {
        let t = |src: &str| ChatTemplate::new(src, "", "").unwrap();
        let tool = json!({"type": "function", "function": {"name": "exec",
            "description": "Quote `?` or `&` <b>'x'</b> é\n", "parameters": {"type": "object",
            "required": ["command"], "properties": {"command": {"type": "string"}, "n": {"type": "number", "minimum": 0}}}}});
        let render = |src: &str| {
            t(src)
                .render(&[], Some(std::slice::from_ref(&tool)), false)
                .unwrap()
        };
        // HF: json.dumps(tool, ensure_ascii=False): key order kept, ", " and ": ",
        // nothing HTML-escaped.
        assert_eq!(
            render("{% for tool in tools %}{{ tool | tojson }}{% endfor %}"),
            r#"{"type": "function", "function": {"name": "exec", "description": "Quote `?` or `&` <b>'x'</b> é\n", "parameters": {"type": "object", "required": ["command"], "properties": {"command": {"type": "string"}, "n": {"type": "number", "minimum": 0}}}}}"#
        );
        // json.dumps(x, indent=2): "," before each newline, empty containers inline.
        let src = "{{ tools[0].function.parameters.properties.n | tojson(indent=2) }}|{{ [] | tojson(indent=2) }}|{{ {'b': [1, {}], 'a': none} | tojson(indent=2) }}";
        assert_eq!(
            render(src),
            "{\n  \"type\": \"number\",\n  \"minimum\": 0\n}|[]|{\n  \"b\": [\n    1,\n    {}\n  ],\n  \"a\": null\n}"
        );
        assert_eq!(
            render("{{ {'b': 1, 'a': 'é'} | tojson(sort_keys=true, ensure_ascii=true, separators=[',', ':']) }}"),
            r#"{"a":"\u00e9","b":1}"#
        );
        assert!(t("{{ 1 | tojson(separators=[',']) }}")
            .render(&[], None, false)
            .is_err());
    }

    #[test]
    fn raise_exception_becomes_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
        let err = t.render(&[], None, true).unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
    }

    #[test]
    fn bad_template_is_a_clear_error() {
        let err = ChatTemplate::new("{% for %}", "", "")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("does not parse"), "{err}");
    }
}
