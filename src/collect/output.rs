//! Building sample batches: the main-turn rows as they came in (every column,
//! unknown ones included) gathered into output order with Arrow's `interleave`
//! kernel, plus the columns collect owns.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow::array::{
    new_null_array, Array, ArrayRef, Int32Array, Int8Array, RecordBatch, StringArray,
};
use arrow::compute::interleave;
use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};

use super::pair::Sample;
use crate::rollout::{column, type_name, COLUMNS};

/// The columns collect writes; any input values in them are replaced.
pub(crate) const OWNED: [&str; 5] = [
    "turn",
    "next_state_role",
    "next_state_text",
    "feedback",
    "feedback_text",
];

/// Rows held in memory until output: a batch and the file it came from.
pub(crate) struct Held {
    pub source: Arc<str>,
    pub batch: RecordBatch,
}

/// The output columns: the claw columns present in any input (and the ones collect
/// owns) in `claw.rollout.v1` order, then extra columns in the order first seen.
/// An extra column must have the same type in every input that has it.
pub(crate) fn output_schema(held: &[Held]) -> Result<SchemaRef> {
    let mut fields: Vec<FieldRef> = Vec::new();
    for c in COLUMNS {
        let present = OWNED.contains(&c.name)
            || held
                .iter()
                .any(|h| h.batch.schema().column_with_name(c.name).is_some());
        if present {
            fields.push(Arc::new(Field::new(c.name, c.ty.data_type(), !c.required)));
        }
    }
    let mut first_seen: Vec<(FieldRef, Arc<str>)> = Vec::new();
    for h in held {
        for f in h.batch.schema().fields() {
            if column(f.name()).is_some() {
                continue;
            }
            match first_seen.iter().find(|(g, _)| g.name() == f.name()) {
                Some((g, source)) if g.data_type() != f.data_type() => bail!(
                    "extra column `{}` is {} in {} but {} in {}: it cannot go into one output",
                    f.name(),
                    type_name(g.data_type()),
                    source,
                    type_name(f.data_type()),
                    h.source
                ),
                Some(_) => {}
                None => first_seen.push((
                    Arc::new(Field::clone(f).with_nullable(true)),
                    h.source.clone(),
                )),
            }
        }
    }
    fields.extend(first_seen.into_iter().map(|(f, _)| f));
    let metadata = held
        .first()
        .map(|h| h.batch.schema().metadata().clone())
        .unwrap_or_default();
    Ok(Arc::new(Schema::new_with_metadata(fields, metadata)))
}

/// Gathers rows of held batches into output batches.
pub(crate) struct Gather {
    schema: SchemaRef,
    /// Per output column that is not owned: that column of every held batch
    /// (a null array where a batch lacks it).
    sources: Vec<Option<Vec<ArrayRef>>>,
}

impl Gather {
    pub fn new(schema: SchemaRef, held: &[Held]) -> Result<Self> {
        let sources = schema
            .fields()
            .iter()
            .map(|f| {
                if OWNED.contains(&f.name().as_str()) {
                    return Ok(None);
                }
                let arrays = held
                    .iter()
                    .map(|h| match h.batch.column_by_name(f.name()) {
                        Some(a) if a.data_type() == f.data_type() => Ok(a.clone()),
                        Some(a) => bail!(
                            "{}: column `{}` is {}, expected {}",
                            h.source,
                            f.name(),
                            type_name(a.data_type()),
                            type_name(f.data_type())
                        ),
                        None if !f.is_nullable() => {
                            bail!("{}: required column `{}` is missing", h.source, f.name())
                        }
                        None => Ok(new_null_array(f.data_type(), h.batch.num_rows())),
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Some(arrays))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Gather { schema, sources })
    }

    /// The rows of `samples`, in order, with the owned columns set from them.
    pub fn batch(&self, samples: &[Sample]) -> Result<RecordBatch> {
        // `interleave` compares the type of every array it is given, so it gets
        // only the held batches these rows come from, not all of them.
        let mut used: Vec<u32> = samples.iter().map(|s| s.row.batch).collect();
        used.sort_unstable();
        used.dedup();
        let indices: Vec<(usize, usize)> = samples
            .iter()
            .map(|s| {
                let local = used.binary_search(&s.row.batch).unwrap_or_default();
                (local, s.row.row as usize)
            })
            .collect();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        for (field, source) in self.schema.fields().iter().zip(&self.sources) {
            let array: ArrayRef = match source {
                Some(arrays) => {
                    let refs: Vec<&dyn Array> =
                        used.iter().map(|&b| arrays[b as usize].as_ref()).collect();
                    interleave(&refs, &indices)
                        .with_context(|| format!("gathering column `{}`", field.name()))?
                }
                None => owned_column(field.name(), samples),
            };
            columns.push(array);
        }
        RecordBatch::try_new(self.schema.clone(), columns).context("building a sample batch")
    }

    /// The rows at `refs` without the owned columns: what a state file keeps of
    /// turns that are still open.
    pub fn rows_without_owned(&self, samples: &[Sample]) -> Result<RecordBatch> {
        let full = self.batch(samples)?;
        let keep: Vec<usize> = (0..full.num_columns())
            .filter(|&i| !OWNED.contains(&full.schema().field(i).name().as_str()))
            .collect();
        full.project(&keep).context("dropping collect's columns")
    }
}

fn owned_column(name: &str, samples: &[Sample]) -> ArrayRef {
    match name {
        "turn" => Arc::new(samples.iter().map(|s| Some(s.turn)).collect::<Int32Array>()),
        "next_state_role" => Arc::new(
            samples
                .iter()
                .map(|s| s.next_state.as_ref().map(|n| n.role.as_str()))
                .collect::<StringArray>(),
        ),
        "next_state_text" => Arc::new(
            samples
                .iter()
                .map(|s| s.next_state.as_ref().map(|n| n.text.as_str()))
                .collect::<StringArray>(),
        ),
        "feedback" => Arc::new(samples.iter().map(|s| s.feedback).collect::<Int8Array>()),
        "feedback_text" => Arc::new(
            samples
                .iter()
                .map(|s| s.feedback_text.as_deref())
                .collect::<StringArray>(),
        ),
        other => unreachable_owned(other, samples.len()),
    }
}

fn unreachable_owned(name: &str, len: usize) -> ArrayRef {
    debug_assert!(false, "`{name}` is not a column collect owns");
    new_null_array(&DataType::Utf8, len)
}
