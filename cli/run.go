package cli

import (
	"bufio"
	"fmt"
	"unicode/utf8"

	"github.com/kvalign/kvalign/align"
	"github.com/kvalign/kvalign/eval"
	"github.com/kvalign/kvalign/transformer"
	"github.com/kvalign/kvalign/transformer/builtin"
	ucli "github.com/urfave/cli/v2"
)

// generateKeep is how many distinct successors of each token the 2-gram
// memory keeps and bans (eval.GenerateOptions.Keep): more than any token
// gathers in a few thousand tokens of text, 6.4 MB of ring directory on
// the device for a 50k vocabulary.
const generateKeep = 1024

// defaultPrompt is the MT-Bench travel-blog question the original work (and
// StreamingLLM) generate from.
const defaultPrompt = "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences and must-see attractions."

func runCommand() *ucli.Command {
	return &ucli.Command{
		Name:  "run",
		Usage: "stream text without end from a bounded KV cache",
		Description: "Generates --num-tokens tokens after --prompt, keeping at most --cache-size cache entries:\n" +
			"--start-size attention sinks plus a recent window. The first token is drawn from the top 5,\n" +
			"later ones from the top 20; end-of-text is never drawn and, unless --allow-repeats, no 2-gram\n" +
			"repeats. Text goes to stdout as it is produced; timings go to stderr.\n" +
			"With no --model, runs offline on the built-in " + builtin.Name + " model.",
		OnUsageError: onUsageError,
		Flags: append([]ucli.Flag{
			&ucli.StringFlag{Name: "model", Aliases: []string{"model_name"}, Usage: "model directory, or a known name resolved through the local Hugging Face cache: distilgpt2/gpt2 (distilbert/distilgpt2), smollm2/rope (HuggingFaceTB/SmolLM2-135M); default: the built-in " + builtin.Name},
			&ucli.StringFlag{Name: "mode", Usage: "kv (KV-Align; synonyms kva, kvn, kv_align, key_value_net), sw (StreamingLLM; sliding_window) or ar (attention recomputation; wr, with_recompute, attention_recomputation); default kv when networks are available, else sw"},
			&ucli.IntFlag{Name: "num-tokens", Aliases: []string{"num_tokens"}, Value: 2000, Usage: "tokens to generate"},
			&ucli.IntFlag{Name: "cache-size", Aliases: []string{"cache_size"}, Value: 54, Usage: "cache entries kept between steps (sinks + window)"},
			&ucli.IntFlag{Name: "start-size", Aliases: []string{"start_size"}, Value: 4, Usage: "attention-sink entries at the start of the cache, never evicted"},
			&ucli.BoolFlag{Name: "allow-repeats", Aliases: []string{"allow_repeats"}, Usage: "allow repeated 2-grams (by default a token that would repeat a 2-gram is never drawn)"},
			&ucli.BoolFlag{Name: "flush", Usage: "flush stdout after every token"},
			&ucli.StringFlag{Name: "prompt", Value: defaultPrompt, Usage: "the text to continue"},
			&ucli.Uint64Flag{Name: "seed", Value: 0, Usage: "random seed: the same seed on the same device gives the same text"},
			&ucli.StringFlag{Name: "align", Usage: "KV-Align networks: a directory with keys_network*/values_network* (.pth or .safetensors) or KEYS,VALUES files; default for known models: $KVALIGN_NETWORKS, ~/.cache/kvalign/networks, $KVALIGN_SHARED/seed/networks"},
		}, deviceFlag(), dtypeFlag(), decodeKernelFlag(), lmHeadFlag(), placementFlag(), alignKernelFlag()),
		Action: runAction,
	}
}

// modelShortName is the name networks of a known model are filed under.
func modelShortName(name string) string {
	switch transformer.KnownRepo(name) {
	case "distilbert/distilgpt2":
		return "distilgpt2"
	case "HuggingFaceTB/SmolLM2-135M":
		return "smollm2"
	}
	return ""
}

func runAction(c *ucli.Context) error {
	n, cacheSize, startSize := c.Int("num-tokens"), c.Int("cache-size"), c.Int("start-size")
	if n <= 0 {
		return usagef("--num-tokens %d: want a positive number", n)
	}
	if startSize < 0 {
		return usagef("--start-size %d: want 0 or more", startSize)
	}
	if cacheSize <= startSize+1 {
		return usagef("--cache-size %d must exceed --start-size %d by at least 2", cacheSize, startSize)
	}
	kernel, err := chosenDecodeKernel(c)
	if err != nil {
		return err
	}
	if err := checkAlignKernel(c); err != nil {
		return err
	}
	modelName := c.String("model")
	var ck *transformer.Checkpoint
	if modelName == "" {
		dir, err := builtin.Extract()
		if err != nil {
			return err
		}
		if ck, err = transformer.LoadCheckpoint(dir); err != nil {
			return err
		}
		ck.Name = builtin.Name
	} else if ck, err = loadCheckpoint(modelName); err != nil {
		return err
	}
	cfg := ck.Cfg
	if cfg.Family == transformer.GPT2 && cacheSize > cfg.MaxPos-1 {
		return usagef("--cache-size %d: GPT-2 models give the incoming token position cache-size, so it must be at most n_positions-1 = %d", cacheSize, cfg.MaxPos-1)
	}

	// Networks: --align, else the defaults of a known model.
	alignSpec := c.String("align")
	if alignSpec == "" {
		if short := modelShortName(modelName); short != "" {
			alignSpec = align.FindDefault(short)
		}
	}
	var mode transformer.Mode
	if m := c.String("mode"); m != "" {
		if mode, err = transformer.ParseMode(m); err != nil {
			return usageError{err}
		}
	} else if alignSpec != "" {
		mode = transformer.KVAlign
	} else {
		mode = transformer.SlidingWindow
		fmt.Fprintf(c.App.ErrWriter, "mode: sw (no KV-Align networks for %s yet; pass --align to use kv)\n", ck.Name)
	}
	var pair *align.Pair
	if mode == transformer.KVAlign {
		if alignSpec == "" {
			return usagef("--mode kv needs KV-Align networks for %s: pass --align DIR or KEYS,VALUES", ck.Name)
		}
		if pair, err = align.LoadPair(alignSpec, modelShortName(modelName)); err != nil {
			return err
		}
		window := cacheSize - startSize
		for _, net := range []*align.Network{pair.Keys, pair.Values} {
			if err := net.Check(cfg.NLayer, cfg.NKV, cfg.HS, window); err != nil {
				return usagef("--align %s with --cache-size %d: %v", alignSpec, cacheSize, err)
			}
		}
	}

	be, dt, err := openBackend(c)
	if err != nil {
		return err
	}
	defer be.Close()
	m, err := transformer.NewModel(cfg, ck.Weights, be, dt)
	if err != nil {
		return err
	}
	defer m.Close()
	// The one token banned by list is end-of-text; repeated 2-grams are
	// banned from the 2-gram memory on the device (eval.Generate).
	opts := transformer.StreamOptions{Mode: mode, CacheSize: cacheSize, StartSize: startSize, MaxBan: 1,
		DecodeKernel: kernel}
	if pair != nil {
		dev, err := uploadNetworks(c, pair, be, dt)
		if err != nil {
			return err
		}
		defer dev.Close()
		opts.Realigner = dev
	}
	s, err := transformer.NewStream(m, opts)
	if err != nil {
		return err
	}
	defer s.Close()

	prompt := toInt32(ck.Tok.Encode(c.String("prompt")))
	if len(prompt) == 0 {
		return usagef("--prompt is empty")
	}
	newline := int32(-1)
	if ids := ck.Tok.Encode("\n"); len(ids) == 1 {
		newline = int32(ids[0])
	}
	out := bufio.NewWriter(c.App.Writer)
	defer out.Flush()
	text := &utf8Stream{w: out}
	flush := c.Bool("flush")
	stats, err := eval.Generate(s, prompt, eval.GenerateOptions{
		NumTokens: n, FirstTopK: 5, TopK: 20, Seed: c.Uint64("seed"), AllowRepeats: c.Bool("allow-repeats"),
		EOS: int32(ck.Tok.EOS()), Newline: newline, Keep: generateKeep,
	}, func(id int32) error {
		text.write(ck.Tok.DecodeToken(int(id)))
		if flush {
			return out.Flush()
		}
		return nil
	})
	text.close()
	out.WriteString("\n")
	if err := out.Flush(); err != nil {
		return err
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(c.App.ErrWriter, "model %s, mode %s, cache %d (start %d), %s\n", ck.Name, mode, cacheSize, startSize, be.Name())
	fmt.Fprintf(c.App.ErrWriter, "prompt tokens %d, generated tokens %d, time to first token %.1f ms, %.3f ms/token after the first\n",
		stats.PromptTokens, stats.Generated, float64(stats.FirstToken.Microseconds())/1000, stats.MsPerToken())
	return nil
}

// utf8Stream writes token bytes as text, holding back an incomplete UTF-8
// sequence until the next token completes it (a byte-level BPE token can end
// mid-character); invalid bytes become U+FFFD as in HF's decode.
type utf8Stream struct {
	w       *bufio.Writer
	pending []byte
}

func (u *utf8Stream) write(b []byte) {
	u.pending = append(u.pending, b...)
	for len(u.pending) > 0 {
		r, size := utf8.DecodeRune(u.pending)
		if r == utf8.RuneError && size <= 1 {
			if !utf8.FullRune(u.pending) {
				return // wait for the rest of the character
			}
			u.w.WriteString(string(utf8.RuneError))
			u.pending = u.pending[1:]
			continue
		}
		u.w.Write(u.pending[:size])
		u.pending = u.pending[size:]
	}
}

func (u *utf8Stream) close() {
	if len(u.pending) > 0 {
		u.w.WriteString(string(utf8.RuneError)) // a character cut off at the end
		u.pending = nil
	}
}
