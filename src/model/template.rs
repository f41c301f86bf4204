//! The model's chat template (`tokenizer.chat_template` in the GGUF), rendered with
//! minijinja the way Hugging Face's `apply_chat_template` does: `trim_blocks` and
//! `lstrip_blocks` on, Python string methods available, `raise_exception` defined.

use anyhow::{anyhow, Context, Result};
use candle_core::quantized::gguf_file;
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
        assert!(out.contains(r#""name":"ls""#), "{out}");
        assert!(out.contains("user: hi"), "{out}");
        assert!(t.supports_tools());
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
