// ringlm: the wire contract between clients and language-model servers.
//
// Transport: framed (a 4-byte big-endian length, then the message) over TCP,
// optionally inside TLS. Protocol: binary (strict). Every server is one node of a
// consistent-hash ring; clients route by session key.
//
// Transport errors: a frame longer than the server's limit (1 MiB by default), a
// frame that does not arrive in time, or bytes that are not a message close the
// connection; a framed message that is malformed (a length past the frame, a
// list, set or map whose element types are not the ones declared here, a string
// that is not UTF-8) gets TApplicationException PROTOCOL_ERROR and the
// connection stays usable. On a server that requires authenticate(), a call of
// any other method but health() and ready() before it gets Unauthorized, its
// arguments unread; those two and authenticate() must then fit in 4 KiB.
//
// Conventions: durations are milliseconds (fields end in _ms); token ids are
// the model's vocabulary ids; text is UTF-8. Optional fields left unset take
// the default written next to them.

namespace py ringlm_rpc    // not "ringlm": that is the server package
namespace java org.ringlm
namespace go ringlm
namespace cpp ringlm
namespace js ringlm

/** Admission order among waiting requests: priority, then deadline, then arrival. */
enum Priority {
  LOW = 0,
  NORMAL = 1,
  HIGH = 2,
}

/** Why a generation ended. */
enum FinishReason {
  STOP = 1,       // the end-of-sequence token, a stop token id or a stop string
  LENGTH = 2,     // max_tokens, or the sequence reached the server's context limit
  DEADLINE = 3,   // deadline_ms passed (the tokens so far are in the result)
  CANCELLED = 4,  // cancel(request_id), or the client went away
  ERROR = 5,      // the model failed for this request (generate raises ModelError instead)
}

/** One turn of a chat, rendered with the model's own chat template. */
struct ChatMessage {
  1: required string role,      // "system", "user" or "assistant"
  2: required string content,
}

/**
 * How the next token is chosen. Order: penalties, temperature, top-k, top-p, min-p.
 * The random draw for each position depends only on the seed and the position, so a
 * request with the same prompt, options and seed, run on the same model, gets the same
 * draws on any server and in any batch. Caveat: the logits themselves can differ in
 * their last bits with the shape of the batch a request shares (float rounding in the
 * matrix multiplies), so a token whose top choices are that close can still change;
 * greedy and filtered sampling (top_k, top_p) keep that rare, but it is not guaranteed.
 */
struct SamplingOptions {
  1: optional double temperature = 1.0,         // 0 = greedy (argmax)
  2: optional i32 top_k = 0,                    // 0 = off
  3: optional double top_p = 1.0,               // in (0, 1]; 1 = off
  4: optional double min_p = 0.0,               // in [0, 1]; 0 = off
  5: optional double repetition_penalty = 1.0,  // in [0.01, 100]; 1 = off
  6: optional double presence_penalty = 0.0,    // in [-2, 2]
  7: optional double frequency_penalty = 0.0,   // in [-2, 2]
  8: optional i64 seed,                         // unset: the server picks one
  9: optional map<i32, double> logit_bias,      // token id -> added to its logit
}

/**
 * A generation. Give exactly one of prompt, prompt_ids or messages.
 */
struct GenerateRequest {
  1: optional string prompt,                    // text, tokenized by the server
  2: optional list<i32> prompt_ids,             // token ids, used as they are
  3: optional list<ChatMessage> messages,       // chat, rendered with the model's template
  4: optional SamplingOptions sampling,         // unset: greedy
  5: optional i32 max_tokens = 256,             // new tokens at most; the server has a limit too
  6: optional list<string> stop,               // stop strings, matched on the text (not returned)
  7: optional list<i32> stop_token_ids,         // stop token ids (not returned as text)
  8: optional Priority priority = Priority.NORMAL,
  9: optional i64 deadline_ms,                  // time budget from the server's receipt; unset = none
  10: optional string request_id,              // for cancel(); unset: the server makes one
  11: optional string session,                 // routing key of the conversation (used by clients)
  12: optional bool logprobs = false,          // return each token's log-probability
  13: optional i32 top_logprobs = 0,           // and this many best alternatives per token (server limit, 20 by default)
  14: optional bool ignore_eos = false,        // keep going past the end-of-sequence token
  15: optional bool add_generation_prompt = true,  // for messages: end with the assistant's turn
  /**
   * Stream failover: the tokens another server already generated for this request.
   * They continue the prompt, count against max_tokens and the penalties, and are not
   * returned again: the result covers only what comes after them. With the same seed
   * the continuation is what the first server would have produced.
   */
  16: optional list<i32> resume_ids,
  /**
   * For prompt: turn control-token text written in it ('<|im_start|>', '<|im_end|>' ...)
   * into the control tokens, for a caller that formats a chat itself. Off by default, so
   * text from users cannot forge turns; message contents are always plain text, and only
   * the model's chat template writes control tokens around them.
   */
  17: optional bool parse_special = false,
}

struct Usage {
  1: i32 prompt_tokens,
  2: i32 cached_prompt_tokens,   // prompt tokens whose KV came from the prefix cache
  3: i32 completion_tokens,
}

struct Timings {
  1: double queue_ms,            // arrival to admission
  2: double ttft_ms,             // arrival to the first new token
  3: double total_ms,            // arrival to the end
  4: double per_token_ms,        // mean time per new token after the first
}

struct TokenLogprob {
  1: i32 token_id,
  2: double logprob,
}

struct GenerateResult {
  1: string request_id,
  2: string text,                       // the new text (not the prompt)
  3: list<i32> token_ids,               // the new token ids
  4: FinishReason finish_reason,
  5: optional string stop_reason,       // the stop string or token id that ended it
  6: optional list<double> logprobs,    // per new token, when asked for
  7: optional list<list<TokenLogprob>> top_logprobs,
  8: Usage usage,
  9: Timings timings,
  10: string server,                    // host:port of the server that produced it
  11: i32 prompt_token_count,           // tokens in the prompt as the server ran it
}

/** What next_chunk returns: what is new since the previous chunk. */
struct StreamChunk {
  1: list<i32> token_ids,
  2: string text,                       // complete characters only
  3: optional list<double> logprobs,
  4: bool done,                         // true on the last chunk of a stream
  5: optional GenerateResult result,    // on the last chunk: the whole result
}

struct ServerStatus {
  1: string server,              // host:port
  2: string model,               // model name or path
  3: bool draining,              // true: finishing what it has, accepting nothing new
  4: i32 running,
  5: map<string, i32> waiting,   // priority name -> queued requests
  6: i32 slots,                  // requests that can run at once
  7: i32 slots_busy,
  8: double load,                // (running + waiting) / slots
  9: i64 prefix_cache_lookups,
  10: i64 prefix_cache_hits,
  11: i64 prefix_cache_hit_tokens,
  12: double tokens_per_second,  // over the last 10 s
  13: i32 open_streams,
  14: i32 connections,
  15: i32 max_prompt_tokens,
  16: i32 max_tokens_limit,
  17: i32 vocab_size,
  18: string device,
  19: string dtype,
  20: double uptime_s,
  21: i64 pid,
  22: bool ready,                // takes new work: engine loop running, no step stuck past the watchdog, not draining
  23: string not_ready_reason,   // why not, when ready is false
}

/** A field of the request is wrong; message says how to fix it. */
exception InvalidRequest {
  1: string field,
  2: string message,
}

/** The server's queue for this priority is full; try again later or elsewhere. */
exception Overloaded {
  1: string message,
  2: i32 retry_after_ms,
  3: bool draining,              // true: the server is shutting down, go elsewhere
}

/** deadline_ms passed; partial holds the tokens generated until then. */
exception DeadlineExceeded {
  1: string message,
  2: optional GenerateResult partial,
}

/** The request was cancelled; partial holds the tokens generated until then. */
exception Cancelled {
  1: string message,
  2: optional GenerateResult partial,
}

/** The server requires authenticate() with its token first on each connection. */
exception Unauthorized {
  1: string message,
}

/** The model failed (a server fault, not the request's). */
exception ModelError {
  1: string message,
}

service Generator {
  /** Generate and return the whole result. */
  GenerateResult generate(1: GenerateRequest request)
      throws (1: InvalidRequest invalid, 2: Overloaded overloaded, 3: DeadlineExceeded deadline,
              4: Cancelled cancelled, 5: Unauthorized unauthorized, 6: ModelError model_error),

  /**
   * Start a streamed generation; returns its stream id (the request id: the caller's,
   * or one the server makes that nobody can guess). Only the connection that opened a
   * stream can poll it; a request_id that names a stream still open is InvalidRequest.
   */
  string open_stream(1: GenerateRequest request)
      throws (1: InvalidRequest invalid, 2: Overloaded overloaded, 5: Unauthorized unauthorized),

  /**
   * Long-poll a stream: returns as soon as there is something new, or after wait_ms
   * with nothing new. The last chunk has done = true and the whole result, whose
   * finish_reason says how it ended (DEADLINE, CANCELLED and ERROR included), except that a
   * draining server that sends the request away raises Overloaded(draining=true): the client
   * resumes it elsewhere from the tokens it received. Reading slowly never cancels a
   * running stream; a finished stream whose last chunk is not polled within the server's
   * stream idle timeout (600 s by default) is dropped. The streams of a connection that
   * closes are cancelled.
   */
  StreamChunk next_chunk(1: string stream_id, 2: i32 wait_ms)
      throws (1: InvalidRequest invalid, 2: Overloaded overloaded, 5: Unauthorized unauthorized,
              6: ModelError model_error),

  /** End a request at the next step, from any connection that knows its id; false if the server does not know it. */
  bool cancel(1: string request_id) throws (1: InvalidRequest invalid, 5: Unauthorized unauthorized),

  list<i32> tokenize(1: string text, 2: bool add_special_tokens, 3: bool parse_special)
      throws (1: InvalidRequest invalid, 5: Unauthorized unauthorized),

  string detokenize(1: list<i32> token_ids, 2: bool skip_special_tokens)
      throws (1: InvalidRequest invalid, 5: Unauthorized unauthorized),

  /** Render chat messages with the model's template (what generate runs for messages). */
  string apply_chat_template(1: list<ChatMessage> messages, 2: bool add_generation_prompt)
      throws (1: InvalidRequest invalid, 5: Unauthorized unauthorized),

  ServerStatus status() throws (5: Unauthorized unauthorized),

  /** Liveness: true while the worker's engine loop runs; answers without authentication. */
  bool health(),

  /**
   * Readiness: true when the server takes new work (model loaded, engine loop running, no
   * model step stuck longer than the server's step timeout, not draining); answers without
   * authentication. Load balancers and the ring client route only to ready servers.
   */
  bool ready(),

  /** Present the shared token; the rest of this connection is then authorized. */
  void authenticate(1: string token) throws (5: Unauthorized unauthorized),
}
