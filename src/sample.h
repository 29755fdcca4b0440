/* sample: one conversation (conversation.h) -> one sample, its token ids and loss mask, as
 * the deck's prepare.format and the tokenizer (tokenizer.h) say. Callers: prepare and
 * --inspect.
 *
 * prepare.format: template
 *   hf tokenizer: the checkpoint's chat template renders the conversation (variables:
 *     messages, tools when the row has them, add_generation_prompt false, the special
 *     tokens bos_token, eos_token, ..., and prepare.template_kwargs) and the text is
 *     encoded whole without added special tokens: transformers' apply_chat_template(
 *     tokenize=True). Loss: with {% generation %} blocks in the template, the tokens that
 *     overlap what the blocks wrote (transformers' return_assistant_tokens_mask). Without,
 *     the prefix rule: for each loss-bearing assistant message i, A = the render of
 *     messages[:i] with add_generation_prompt true and B = the render of messages[:i+1];
 *     the message's text is [len(A), len(B) without trailing whitespace) of the whole
 *     render, which must begin with both (else the message cannot be located: an error).
 *     Tokens overlapping that text carry loss: the assistant's content and the end-of-turn
 *     token the template writes after it.
 *   byte tokenizer: the fixed template BOS, (ROLE content END_OF_TURN)..., EOS; loss on
 *     the assistant's content and its END_OF_TURN. Roles system, user, assistant.
 * prepare.format: esft_reference (the ESFT reference's own layout; needs bos and eos)
 *   BOS, then per message: user "User: " + q.strip() + "\n\nAssistant:" (no loss);
 *   assistant " " + a.strip() then EOS (loss), each piece encoded on its own.
 * A {"text": T} row is T encoded with the tokenizer's special tokens (its post-processor:
 * BOS where the tokenizer adds one), then EOS; loss on everything but a leading BOS.
 * An assistant message with loss false contributes no loss in any format. */
#ifndef ESFT_SAMPLE_H
#define ESFT_SAMPLE_H

#include <stddef.h>

#include "conversation.h"
#include "deck.h"
#include "tokenizer.h"

/* Appends one sample to out. Keys the format cannot use (tools or message keys that the
 * byte or esft_reference layouts have no place for) are added to c->dropped. Returns 0,
 * or -1 with the reason in err (out unchanged). */
int sample_format(const struct tokenizer *tok, enum prepare_format format,
                  struct conversation *c, struct token_buffer *out, char *err, size_t err_size);

#endif
