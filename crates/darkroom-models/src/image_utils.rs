//! `darkroom/image-utils`: resizes, crops and converts images (PNG, JPEG, WebP) with the `image` crate. Inputs are
//! decoded under limits (no decompression bombs), EXIF orientation is applied, and the CPU work runs on tokio's
//! blocking pool.

use std::io::Cursor;

use async_trait::async_trait;
use darkroom_core::app::AppSpec;
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::codecs::webp::WebPEncoder;
use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::files::File;
use crate::{Model, ModelError, RunContext, builtin_spec};

pub const APP_ID: &str = "darkroom/image-utils";

/// The largest output width or height.
pub const MAX_OUTPUT_DIM: u32 = 8192;
/// The largest input width or height the decoder accepts.
pub const MAX_INPUT_DIM: u32 = 16384;
/// The most memory the decoder may allocate for one input image.
pub const MAX_DECODE_ALLOC: u64 = 512 * 1024 * 1024;

/// What to do with the image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Resize,
    Crop,
    #[default]
    Convert,
}

/// How `resize` fits the image into `width`×`height`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Fit {
    #[default]
    Contain,
    Cover,
    Fill,
}

impl Fit {
    fn name(self) -> &'static str {
        match self {
            Fit::Contain => "contain",
            Fit::Cover => "cover",
            Fit::Fill => "fill",
        }
    }
}

/// An output image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    Png,
    Jpeg,
    Webp,
}

impl OutputFormat {
    fn content_type(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Webp => "image/webp",
        }
    }
    fn name(self) -> &'static str {
        match self {
            OutputFormat::Png => "PNG",
            OutputFormat::Jpeg => "JPEG",
            OutputFormat::Webp => "WEBP",
        }
    }
    fn file_name(self) -> &'static str {
        match self {
            OutputFormat::Png => "image.png",
            OutputFormat::Jpeg => "image.jpg",
            OutputFormat::Webp => "image.webp",
        }
    }
    fn from_image_format(f: ImageFormat) -> Option<Self> {
        match f {
            ImageFormat::Png => Some(OutputFormat::Png),
            ImageFormat::Jpeg => Some(OutputFormat::Jpeg),
            ImageFormat::WebP => Some(OutputFormat::Webp),
            _ => None,
        }
    }
}

fn default_quality() -> u8 {
    90
}

/// Input of `darkroom/image-utils`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct ImageUtilsInput {
    /// The image to process (PNG, JPEG or WebP): a data URI, a URL of this server's storage, or an http(s) URL.
    pub image_url: String,
    /// `resize` scales the image to `width`/`height` as `fit` says; `crop` cuts the rectangle `x`, `y`, `width`,
    /// `height` out of it; `convert` only re-encodes it in `output_format`.
    #[serde(default)]
    pub operation: Operation,
    /// Target width in pixels (`resize`; with only one of `width`/`height` the aspect ratio is kept), or the width
    /// of the rectangle (`crop`, required).
    #[serde(default)]
    #[schemars(range(min = 1, max = 8192))]
    pub width: Option<u32>,
    /// Target height in pixels (`resize`; with only one of `width`/`height` the aspect ratio is kept), or the
    /// height of the rectangle (`crop`, required).
    #[serde(default)]
    #[schemars(range(min = 1, max = 8192))]
    pub height: Option<u32>,
    /// How `resize` fits the image into `width`×`height`: `contain` keeps the aspect ratio inside the box,
    /// `cover` fills the box and crops the overflow around the centre, `fill` stretches to exactly the box.
    #[serde(default)]
    pub fit: Fit,
    /// Left edge of the `crop` rectangle, in pixels from the left.
    #[serde(default)]
    pub x: u32,
    /// Top edge of the `crop` rectangle, in pixels from the top.
    #[serde(default)]
    pub y: u32,
    /// Format of the output: `png`, `jpeg` or `webp` (lossless). Defaults to the input's format.
    #[serde(default)]
    pub output_format: Option<OutputFormat>,
    /// JPEG quality, 1 (smallest) to 100 (best).
    #[serde(default = "default_quality")]
    #[schemars(range(min = 1, max = 100))]
    pub quality: u8,
    /// Return the output image as a data URI in the response instead of a URL of this server's storage.
    #[serde(default)]
    pub sync_mode: bool,
}

/// Output of `darkroom/image-utils`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct ImageUtilsOutput {
    /// The processed image, with its `width` and `height`.
    pub image: File,
}

pub struct ImageUtils;

fn field_error(field: &str, msg: impl Into<String>) -> ModelError {
    ModelError::field(field, msg)
}

fn check_dim(field: &str, v: Option<u32>) -> Result<(), ModelError> {
    match v {
        Some(v) if !(1..=MAX_OUTPUT_DIM).contains(&v) => {
            Err(field_error(field, format!("{field} must be between 1 and {MAX_OUTPUT_DIM}, got {v}")))
        }
        _ => Ok(()),
    }
}

/// What the blocking step produced.
struct Processed {
    data: Vec<u8>,
    format: OutputFormat,
    input_format: ImageFormat,
    input_size: (u32, u32),
    output_size: (u32, u32),
}

/// Decodes under limits and applies the EXIF orientation. Errors are 422s naming `image_url`.
pub(crate) fn decode(data: &[u8]) -> Result<(DynamicImage, ImageFormat), ModelError> {
    let format = image::guess_format(data).map_err(|_| {
        field_error("image_url", "Could not decode the image: unrecognised format (expected PNG, JPEG or WebP)")
    })?;
    if OutputFormat::from_image_format(format).is_none() {
        return Err(field_error(
            "image_url",
            format!("Unsupported image format {}: expected PNG, JPEG or WebP", format_name(format)),
        ));
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_INPUT_DIM);
    limits.max_image_height = Some(MAX_INPUT_DIM);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    let mut reader = ImageReader::with_format(Cursor::new(data), format);
    reader.limits(limits);
    let decoded = reader.into_decoder().and_then(|mut decoder| {
        if decoder.total_bytes() > MAX_DECODE_ALLOC {
            return Err(ImageError::Limits(image::error::LimitError::from_kind(
                image::error::LimitErrorKind::InsufficientMemory,
            )));
        }
        let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
        let mut img = DynamicImage::from_decoder(decoder)?;
        img.apply_orientation(orientation);
        Ok(img)
    });
    match decoded {
        Ok(img) => Ok((img, format)),
        Err(ImageError::Limits(_)) => Err(field_error(
            "image_url",
            format!(
                "The image is too large to process: at most {MAX_INPUT_DIM}×{MAX_INPUT_DIM} pixels and {} MiB \
                 decoded",
                MAX_DECODE_ALLOC / (1024 * 1024)
            ),
        )),
        Err(e) => Err(field_error("image_url", format!("Could not decode the image: {e}"))),
    }
}

fn format_name(f: ImageFormat) -> String {
    f.extensions_str().first().map(|s| s.to_uppercase()).unwrap_or_else(|| format!("{f:?}"))
}

/// Scales `img` as `input` says (`operation: resize`).
fn resize(img: &DynamicImage, input: &ImageUtilsInput) -> Result<DynamicImage, ModelError> {
    let (w, h) = (img.width(), img.height());
    let scaled = |given: u32, from: u32, to: u32| -> u64 {
        // to * given / from, rounded, at least 1.
        ((u64::from(to) * u64::from(given) + u64::from(from) / 2) / u64::from(from)).max(1)
    };
    let out = match (input.width, input.height) {
        (None, None) => return Err(field_error("width", "resize needs width, height or both")),
        (Some(nw), None) => {
            let nh = scaled(nw, w, h);
            if nh > u64::from(MAX_OUTPUT_DIM) {
                return Err(field_error(
                    "width",
                    format!("keeping the aspect ratio, width {nw} gives a height of {nh}, over {MAX_OUTPUT_DIM}"),
                ));
            }
            img.resize_exact(nw, nh as u32, FilterType::Lanczos3)
        }
        (None, Some(nh)) => {
            let nw = scaled(nh, h, w);
            if nw > u64::from(MAX_OUTPUT_DIM) {
                return Err(field_error(
                    "height",
                    format!("keeping the aspect ratio, height {nh} gives a width of {nw}, over {MAX_OUTPUT_DIM}"),
                ));
            }
            img.resize_exact(nw as u32, nh, FilterType::Lanczos3)
        }
        (Some(nw), Some(nh)) => match input.fit {
            Fit::Contain => img.resize(nw, nh, FilterType::Lanczos3),
            Fit::Cover => img.resize_to_fill(nw, nh, FilterType::Lanczos3),
            Fit::Fill => img.resize_exact(nw, nh, FilterType::Lanczos3),
        },
    };
    Ok(out)
}

/// Cuts the rectangle out of `img` (`operation: crop`).
fn crop(img: &DynamicImage, input: &ImageUtilsInput) -> Result<DynamicImage, ModelError> {
    let (w, h) = (img.width(), img.height());
    let cw = input.width.ok_or_else(|| field_error("width", "crop needs width"))?;
    let ch = input.height.ok_or_else(|| field_error("height", "crop needs height"))?;
    if input.x >= w {
        return Err(field_error("x", format!("x {} is outside the image ({w}×{h})", input.x)));
    }
    if input.y >= h {
        return Err(field_error("y", format!("y {} is outside the image ({w}×{h})", input.y)));
    }
    if u64::from(input.x) + u64::from(cw) > u64::from(w) {
        return Err(field_error(
            "width",
            format!("the crop rectangle (x {} + width {cw}) goes past the image's width {w}", input.x),
        ));
    }
    if u64::from(input.y) + u64::from(ch) > u64::from(h) {
        return Err(field_error(
            "height",
            format!("the crop rectangle (y {} + height {ch}) goes past the image's height {h}", input.y),
        ));
    }
    Ok(img.crop_imm(input.x, input.y, cw, ch))
}

pub(crate) fn encode(img: DynamicImage, format: OutputFormat, quality: u8) -> Result<Vec<u8>, ImageError> {
    let mut out = Vec::new();
    match format {
        OutputFormat::Png => img.write_with_encoder(PngEncoder::new(&mut out))?,
        OutputFormat::Jpeg => DynamicImage::ImageRgb8(img.into_rgb8())
            .write_with_encoder(JpegEncoder::new_with_quality(&mut out, quality))?,
        OutputFormat::Webp => {
            // The WebP encoder takes 8-bit images only.
            let img = match img {
                DynamicImage::ImageLuma8(_)
                | DynamicImage::ImageLumaA8(_)
                | DynamicImage::ImageRgb8(_)
                | DynamicImage::ImageRgba8(_) => img,
                img if img.color().has_alpha() => DynamicImage::ImageRgba8(img.into_rgba8()),
                img => DynamicImage::ImageRgb8(img.into_rgb8()),
            };
            img.write_with_encoder(WebPEncoder::new_lossless(&mut out))?
        }
    }
    Ok(out)
}

/// The CPU part of a run: decode, transform, encode.
fn process(data: &[u8], input: &ImageUtilsInput, cancel: &CancellationToken) -> Result<Processed, ModelError> {
    let (img, input_format) = decode(data)?;
    if cancel.is_cancelled() {
        return Err(ModelError::Cancelled);
    }
    let input_size = (img.width(), img.height());
    let img = match input.operation {
        Operation::Resize => resize(&img, input)?,
        Operation::Crop => crop(&img, input)?,
        Operation::Convert => img,
    };
    if cancel.is_cancelled() {
        return Err(ModelError::Cancelled);
    }
    let output_size = (img.width(), img.height());
    let format = input.output_format.or(OutputFormat::from_image_format(input_format)).unwrap_or(OutputFormat::Png);
    let data = encode(img, format, input.quality)
        .map_err(|e| ModelError::app(500, format!("Could not encode the output image: {e}")))?;
    Ok(Processed { data, format, input_format, input_size, output_size })
}

#[async_trait]
impl Model for ImageUtils {
    fn spec(&self) -> AppSpec {
        let spec = builtin_spec::<ImageUtilsInput, ImageUtilsOutput>(
            APP_ID,
            "Image utilities",
            "Resizes, crops and converts images between PNG, JPEG and WebP.",
            // One core per runner; idle runners stop after a minute (scale to zero).
            darkroom_core::scaling::ScalingKnobs {
                max_concurrency: 2,
                max_multiplexing: 2,
                cpu_threads: 1,
                ..Default::default()
            },
            false,
        );
        crate::with_catalog(
            spec,
            "image-to-image",
            &["utility", "resize", "crop", "convert"],
            None,
            vec![],
            darkroom_core::billing::Billing {
                unit: darkroom_core::billing::BillingUnit::Image,
                estimate: darkroom_core::billing::UnitEstimate::PerRequest,
            },
        )
    }

    fn has_realtime(&self, path: &str) -> bool {
        path.is_empty()
    }

    /// Interactive resizing and conversion of small frames: the same input as a request (the image as a msgpack
    /// binary, which arrives as a data URI, or a data URI string), the output image inline as a data URI.
    async fn realtime(&self, path: &str, input: Value, rt: &crate::RealtimeContext) -> Result<Value, ModelError> {
        let (events, _) = tokio::sync::mpsc::unbounded_channel();
        let ctx = RunContext::new(rt.session_id.clone(), 1, path.to_string(), rt.cancel.clone(), events)
            .with_files(std::sync::Arc::new(crate::InlineFiles), true);
        self.run(input, ctx).await
    }

    async fn run(&self, input: Value, ctx: RunContext) -> Result<Value, ModelError> {
        let input: ImageUtilsInput = serde_json::from_value(input).map_err(|e| ModelError::App {
            status: 422,
            body: json!({"detail": [{"loc": ["body"], "msg": e.to_string(), "type": "value_error"}]}),
        })?;
        check_dim("width", input.width)?;
        check_dim("height", input.height)?;
        if !(1..=100).contains(&input.quality) {
            return Err(field_error("quality", format!("quality must be between 1 and 100, got {}", input.quality)));
        }
        let fetched = ctx.fetch_input("image_url", &input.image_url).await?;
        ctx.progress(0.2, Some("decoding".into()));
        if ctx.cancel.is_cancelled() {
            return Err(ModelError::Cancelled);
        }
        let cancel = ctx.cancel.clone();
        let operation = input.operation;
        let fit = input.fit;
        let data = fetched.data;
        let p = tokio::task::spawn_blocking(move || process(&data, &input, &cancel))
            .await
            .map_err(|e| ModelError::app(500, format!("Image processing failed: {e}")))??;
        if ctx.cancel.is_cancelled() {
            return Err(ModelError::Cancelled);
        }
        let what = match operation {
            Operation::Resize => format!("resize ({})", fit.name()),
            Operation::Crop => "crop".to_string(),
            Operation::Convert => "convert".to_string(),
        };
        ctx.log(
            "INFO",
            format!(
                "{what}: {} {}×{} -> {} {}×{} ({} bytes)",
                format_name(p.input_format),
                p.input_size.0,
                p.input_size.1,
                p.format.name(),
                p.output_size.0,
                p.output_size.1,
                p.data.len()
            ),
        );
        let image = ctx
            .output_file(bytes::Bytes::from(p.data), p.format.content_type(), p.format.file_name(), Some(p.output_size))
            .await?;
        ctx.progress(1.0, None);
        ctx.bill(1.0);
        Ok(serde_json::to_value(ImageUtilsOutput { image }).expect("serialises"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::{data_uri, parse_data_uri};
    use tokio::sync::mpsc;

    fn ctx(cancel: CancellationToken) -> (RunContext, mpsc::UnboundedReceiver<crate::ModelEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (RunContext::new("r".into(), 1, String::new(), cancel, tx), rx)
    }

    /// A 40×20 RGBA gradient, every pixel distinct.
    fn source() -> image::RgbaImage {
        image::RgbaImage::from_fn(40, 20, |x, y| image::Rgba([(x * 6) as u8, (y * 12) as u8, 100, 255 - x as u8]))
    }

    fn source_png() -> String {
        let mut buf = Vec::new();
        DynamicImage::ImageRgba8(source()).write_to(Cursor::new(&mut buf), ImageFormat::Png).unwrap();
        data_uri("image/png", &buf)
    }

    async fn run_ok(mut input: Value) -> (File, DynamicImage, Vec<u8>) {
        input["image_url"] = json!(source_png());
        let (c, _rx) = ctx(CancellationToken::new());
        let out = ImageUtils.run(input, c).await.unwrap();
        let out: ImageUtilsOutput = serde_json::from_value(out).unwrap();
        let data = parse_data_uri(&out.image.url, u64::MAX).unwrap();
        assert_eq!(data.content_type.as_deref(), Some(out.image.content_type.as_str()));
        assert_eq!(out.image.file_size, data.data.len() as u64);
        let img = image::load_from_memory(&data.data).unwrap();
        assert_eq!((out.image.width, out.image.height), (Some(img.width()), Some(img.height())));
        (out.image, img, data.data.to_vec())
    }

    async fn run_err(input: Value) -> ModelError {
        let (c, _rx) = ctx(CancellationToken::new());
        ImageUtils.run(input, c).await.unwrap_err()
    }

    fn loc_field(e: &ModelError) -> String {
        match e {
            ModelError::App { status: 422, body } => body["detail"][0]["loc"][1].as_str().unwrap().to_string(),
            other => panic!("not a 422: {other:?}"),
        }
    }

    #[tokio::test]
    async fn resizes_with_each_fit() {
        let (f, img, _) = run_ok(json!({"operation": "resize", "width": 20, "height": 20})).await;
        assert_eq!((img.width(), img.height()), (20, 10));
        assert_eq!((f.content_type.as_str(), f.file_name.as_str()), ("image/png", "image.png"));
        let (_, img, _) = run_ok(json!({"operation": "resize", "width": 10})).await;
        assert_eq!((img.width(), img.height()), (10, 5));
        let (_, img, _) = run_ok(json!({"operation": "resize", "height": 40})).await;
        assert_eq!((img.width(), img.height()), (80, 40));
        let (_, img, _) = run_ok(json!({"operation": "resize", "width": 20, "height": 20, "fit": "cover"})).await;
        assert_eq!((img.width(), img.height()), (20, 20));
        let (_, img, _) = run_ok(json!({"operation": "resize", "width": 7, "height": 30, "fit": "fill"})).await;
        assert_eq!((img.width(), img.height()), (7, 30));
        let e = run_err(json!({"image_url": source_png(), "operation": "resize"})).await;
        assert_eq!(loc_field(&e), "width");
    }

    #[tokio::test]
    async fn crops_the_exact_region() {
        let (f, img, _) = run_ok(json!({"operation": "crop", "x": 5, "y": 3, "width": 10, "height": 8})).await;
        assert_eq!((f.width, f.height), (Some(10), Some(8)));
        let src = source();
        let out = img.to_rgba8();
        for (x, y, p) in out.enumerate_pixels() {
            assert_eq!(p, src.get_pixel(x + 5, y + 3), "pixel {x},{y}");
        }
        // The whole image is a valid rectangle.
        let (_, img, _) = run_ok(json!({"operation": "crop", "width": 40, "height": 20})).await;
        assert_eq!(img.to_rgba8(), src);
    }

    #[tokio::test]
    async fn converts_to_jpeg_and_webp() {
        let (f, img, bytes) = run_ok(json!({"output_format": "jpeg", "quality": 80, "sync_mode": true})).await;
        assert_eq!((f.content_type.as_str(), f.file_name.as_str()), ("image/jpeg", "image.jpg"));
        assert_eq!(image::guess_format(&bytes).unwrap(), ImageFormat::Jpeg);
        assert_eq!((img.width(), img.height()), (40, 20));
        assert!(!img.color().has_alpha());
        let (f, img, bytes) = run_ok(json!({"operation": "convert", "output_format": "webp"})).await;
        assert_eq!((f.content_type.as_str(), f.file_name.as_str()), ("image/webp", "image.webp"));
        assert_eq!(image::guess_format(&bytes).unwrap(), ImageFormat::WebP);
        // Lossless: the pixels survive.
        assert_eq!(img.to_rgba8(), source());
        // Extra fields are tolerated; the format defaults to the input's.
        let (f, img, _) = run_ok(json!({"unknown_field": 1})).await;
        assert_eq!(f.content_type, "image/png");
        assert_eq!(img.to_rgba8(), source());
    }

    #[tokio::test]
    async fn bad_crops_and_bad_images_are_422s() {
        let url = source_png();
        let e = run_err(json!({"image_url": url, "operation": "crop", "x": 35, "width": 10, "height": 5})).await;
        assert_eq!(loc_field(&e), "width");
        let ModelError::App { body, .. } = &e else { unreachable!() };
        assert_eq!(body["detail"][0]["type"], "value_error");
        let e = run_err(json!({"image_url": url, "operation": "crop", "y": 15, "width": 10, "height": 6})).await;
        assert_eq!(loc_field(&e), "height");
        let e = run_err(json!({"image_url": url, "operation": "crop", "x": 40, "width": 1, "height": 1})).await;
        assert_eq!(loc_field(&e), "x");
        let e = run_err(json!({"image_url": url, "operation": "crop", "height": 5})).await;
        assert_eq!(loc_field(&e), "width");
        let e = run_err(json!({"image_url": data_uri("image/png", b"definitely not an image")})).await;
        assert_eq!(loc_field(&e), "image_url");
        // A valid PNG signature with a corrupt body.
        let e = run_err(json!({"image_url": data_uri("image/png", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDRjunk")})).await;
        assert_eq!(loc_field(&e), "image_url");
        let e = run_err(json!({"image_url": "https://example.invalid/x.png"})).await;
        assert_eq!(loc_field(&e), "image_url");
        let e = run_err(json!({"image_url": url, "operation": "resize", "width": 0})).await;
        assert_eq!(loc_field(&e), "width");
    }

    #[tokio::test]
    async fn refuses_decompression_bombs() {
        // A 20000×1 PNG is small on the wire but wider than the decoder accepts.
        let mut buf = Vec::new();
        DynamicImage::ImageLuma8(image::GrayImage::new(20_000, 1))
            .write_to(Cursor::new(&mut buf), ImageFormat::Png)
            .unwrap();
        let e = run_err(json!({"image_url": data_uri("image/png", &buf)})).await;
        assert_eq!(loc_field(&e), "image_url");
        let ModelError::App { body, .. } = &e else { unreachable!() };
        assert!(body["detail"][0]["msg"].as_str().unwrap().contains("too large"), "{body}");
    }

    #[tokio::test]
    async fn cancelled_runs_stop() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let (c, _rx) = ctx(cancel);
        let e = ImageUtils.run(json!({"image_url": source_png()}), c).await.unwrap_err();
        assert_eq!(e, ModelError::Cancelled);
    }

    #[tokio::test]
    async fn logs_and_reports_progress() {
        let (c, mut rx) = ctx(CancellationToken::new());
        ImageUtils.run(json!({"image_url": source_png(), "operation": "resize", "width": 20}), c).await.unwrap();
        let (mut logs, mut progress) = (Vec::new(), 0);
        while let Ok(e) = rx.try_recv() {
            match e {
                crate::ModelEvent::Log { message, .. } => logs.push(message),
                crate::ModelEvent::Progress { .. } => progress += 1,
                _ => {}
            }
        }
        assert_eq!(logs.len(), 1, "{logs:?}");
        assert!(logs[0].starts_with("resize (contain): PNG 40×20 -> PNG 20×10"), "{logs:?}");
        assert_eq!(progress, 2);
    }

    #[test]
    fn schema_validates_in_the_gateway() {
        let app = darkroom_core::app::CompiledApp::compile(ImageUtils.spec()).unwrap();
        let url = "data:image/png;base64,AAAA";
        assert!(app.validate(&json!({"image_url": url})).is_ok());
        assert!(
            app.validate(&json!({"image_url": url, "operation": "resize", "width": 8192, "fit": "cover", "extra": 1}))
                .is_ok()
        );
        let e = app.validate(&json!({"image_url": url, "width": 0})).unwrap_err();
        assert_eq!(e.detail.unwrap()[0]["loc"], json!(["body", "width"]));
        let e = app.validate(&json!({"image_url": url, "height": 8193})).unwrap_err();
        assert_eq!(e.detail.unwrap()[0]["loc"], json!(["body", "height"]));
        let e = app.validate(&json!({"image_url": url, "quality": 0})).unwrap_err();
        assert_eq!(e.detail.unwrap()[0]["loc"], json!(["body", "quality"]));
        let e = app.validate(&json!({"image_url": url, "operation": "rotate", "output_format": "gif"})).unwrap_err();
        assert_eq!(e.detail.unwrap().as_array().unwrap().len(), 2);
        assert!(app.validate(&json!({"operation": "convert"})).is_err());
    }
}
