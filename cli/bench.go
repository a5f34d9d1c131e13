package cli

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/kvalign/kvalign/align"
	"github.com/kvalign/kvalign/eval"
	"github.com/kvalign/kvalign/gpu"
	"github.com/kvalign/kvalign/transformer"
	ucli "github.com/urfave/cli/v2"
)

func benchCommand() *ucli.Command {
	return &ucli.Command{
		Name:  "bench",
		Usage: "measure decode latency against the memory-bandwidth floor",
		Subcommands: []*ucli.Command{
			{
				Name:  "decode",
				Usage: "median ms/token of batch-1 decoding with a full cache, weight traffic GB/s and the fraction of the card's copy bandwidth",
				Description: "Random weights of the exact config are built in process when --config names a known\n" +
					"config (distilgpt2, smollm2-135m); a model directory is loaded as is.",
				OnUsageError: onUsageError,
				Flags: append([]ucli.Flag{
					&ucli.StringFlag{Name: "config", Value: "distilgpt2", Usage: "distilgpt2, smollm2-135m, or a model directory"},
					&ucli.IntFlag{Name: "cache-size", Value: 255, Usage: "cache entries (the cache is full while timing)"},
					&ucli.IntFlag{Name: "steps", Value: 300, Usage: "timed decode steps"},
					&ucli.IntFlag{Name: "warmup", Value: 30, Usage: "untimed steps first"},
				}, deviceFlag(), dtypeFlag(), decodeKernelFlag(), lmHeadFlag(), placementFlag()),
				Action: benchDecode,
			},
			{
				Name:         "run",
				Usage:        "median ms/token per mode (sw, kv, ar) and cache size, with KV-Align networks of the original sizes",
				OnUsageError: onUsageError,
				Flags: append([]ucli.Flag{
					&ucli.StringSliceFlag{Name: "config", Value: ucli.NewStringSlice("distilgpt2", "smollm2-135m"), Usage: "configs or model directories"},
					&ucli.IntSliceFlag{Name: "cache-size", Value: ucli.NewIntSlice(32, 64, 128, 255), Usage: "cache sizes"},
					&ucli.StringSliceFlag{Name: "mode", Value: ucli.NewStringSlice("sw", "kv", "ar"), Usage: "modes"},
					&ucli.IntFlag{Name: "steps", Value: 200, Usage: "timed decode steps per cell"},
					&ucli.IntFlag{Name: "warmup", Value: 20, Usage: "untimed steps per cell"},
					&ucli.StringFlag{Name: "json", Usage: "also write the results to this JSON file"},
				}, deviceFlag(), dtypeFlag(), decodeKernelFlag(), lmHeadFlag(), placementFlag(), alignKernelFlag()),
				Action: benchRun,
			},
		},
	}
}

// benchModel builds random weights of a known config, or loads a directory.
func benchModel(name string) (*transformer.Config, *transformer.Weights, error) {
	if cfg, err := transformer.BuiltinConfig(name); err == nil {
		return cfg, transformer.RandomWeights(cfg, 1), nil
	}
	if strings.ContainsRune(name, filepath.Separator) || fileExists(name) {
		cfg, err := transformer.LoadConfig(filepath.Join(name, "config.json"))
		if err != nil {
			return nil, nil, err
		}
		w, err := transformer.LoadWeights(name, cfg)
		return cfg, w, err
	}
	return nil, nil, usagef("unknown --config %q (want distilgpt2, smollm2-135m or a model directory)", name)
}

// weightBytes is what one decode step must read: every weight once (the
// learned position table excepted: one row of it is read).
func weightBytes(cfg *transformer.Config, dt gpu.DType) float64 {
	n := cfg.ParamCount()
	if cfg.Family == transformer.GPT2 {
		n -= cfg.MaxPos * cfg.C
	}
	return float64(n) * float64(dt.Size())
}

func benchDecode(c *ucli.Context) error {
	kernel, err := chosenDecodeKernel(c)
	if err != nil {
		return err
	}
	cfg, w, err := benchModel(c.String("config"))
	if err != nil {
		return err
	}
	be, dt, err := openBackend(c)
	if err != nil {
		return err
	}
	defer be.Close()
	m, err := transformer.NewModel(cfg, w, be, dt)
	if err != nil {
		return err
	}
	defer m.Close()
	size := c.Int("cache-size")
	s, err := transformer.NewStream(m, transformer.StreamOptions{Mode: transformer.SlidingWindow, CacheSize: size, StartSize: 4, MaxBan: 1,
		DecodeKernel: kernel})
	if err != nil {
		return usageError{err}
	}
	defer s.Close()
	lat, err := eval.MeasureDecode(s, cfg.VocabSize, c.Int("warmup"), c.Int("steps"))
	if err != nil {
		return err
	}
	wdt := be.WeightDType(dt)
	bytes := weightBytes(cfg, wdt)
	gbs := bytes / lat.Median.Seconds() / 1e9
	out := c.App.Writer
	fmt.Fprintf(out, "config %s, %s weights, cache %d, %s, %s\n", c.String("config"), wdt, size, be.Name(), decodeKernel(s))
	fmt.Fprintf(out, "decode: median %.4f ms/token (p10 %.4f, p90 %.4f) over %d steps\n", eval.Ms(lat.Median), eval.Ms(lat.P10), eval.Ms(lat.P90), lat.Steps)
	if pl := s.Runner().Placement(); pl.Before > 0 {
		moved := "none moved"
		if len(pl.Moved) > 0 {
			moved = strings.Join(pl.Moved, ", ") + " moved by 64 KB"
		}
		fmt.Fprintf(out, "state placement: %s; step %.4f → %.4f ms (GPU, back to back)\n", moved, eval.Ms(pl.Before), eval.Ms(pl.After))
	}
	if _, gpuBackend := be.(gpu.BandwidthMeter); gpuBackend && lat.Device > 0 {
		fmt.Fprintf(out, "GPU alone: %.4f ms/step (graph replayed back to back); the host adds %.4f ms/token\n", eval.Ms(lat.Device), eval.Ms(lat.Median-lat.Device))
	}
	fmt.Fprintf(out, "weight traffic: %.1f MB/token, %.0f GB/s achieved\n", bytes/1e6, gbs)
	if bw, ok := be.(gpu.BandwidthMeter); ok {
		copyGBs, err := bw.CopyBandwidth(1 << 30)
		if err != nil {
			return err
		}
		floor := bytes / (copyGBs * 1e9) * 1e3
		fmt.Fprintf(out, "copy bandwidth: %.0f GB/s measured; floor %.4f ms/token; achieved %.0f%% of copy bandwidth (%.2fx the floor)\n",
			copyGBs, floor, 100*gbs/copyGBs, eval.Ms(lat.Median)/floor)
	}
	return nil
}

type benchCell struct {
	Config    string  `json:"config"`
	Mode      string  `json:"mode"`
	CacheSize int     `json:"cache_size"`
	MedianMs  float64 `json:"median_ms"`
	P10Ms     float64 `json:"p10_ms"`
	P90Ms     float64 `json:"p90_ms"`
	Device    string  `json:"device"`
	DType     string  `json:"dtype"`
	// AlignKernel says how the realignment networks ran (kv mode).
	AlignKernel string `json:"align_kernel,omitempty"`
	// The anchors of a known config (benchAnchors), ms/token.
	TargetMs float64 `json:"target_ms,omitempty"`
	EagerMs  float64 `json:"pytorch_eager_ms,omitempty"`
}

// benchAnchors are, per known config and mode, the latency target of
// issue #4 (one H100, fp16 weights) and the original PyTorch code's eager
// latency on the same class of card, ms/token.
var benchAnchors = map[string]map[string]struct{ target, eager float64 }{
	"distilgpt2":   {"sw": {0.15, 2.5}, "kv": {0.20, 5.3}, "ar": {1.0, 3.0}},
	"smollm2-135m": {"sw": {0.30, 19}, "kv": {0.40, 31}, "ar": {2.0, 23}},
}

// anchorTable is a markdown table of each mode's slowest cell against the
// config's anchors, "" for configs without them.
func anchorTable(config string, cells []benchCell) string {
	anchors, ok := benchAnchors[config]
	if !ok {
		return ""
	}
	var b strings.Builder
	b.WriteString("| mode | slowest ms/token | target (H100, fp16) | PyTorch eager ms/token | × faster than eager |\n|---|---|---|---|---|\n")
	var modes []string
	worst := map[string]float64{}
	for _, c := range cells {
		if c.Config != config {
			continue
		}
		if _, seen := worst[c.Mode]; !seen {
			modes = append(modes, c.Mode)
		}
		worst[c.Mode] = max(worst[c.Mode], c.MedianMs)
	}
	for _, m := range modes {
		a, ok := anchors[m]
		if !ok {
			continue
		}
		verdict := "met"
		if worst[m] > a.target {
			verdict = "not met"
		}
		fmt.Fprintf(&b, "| %s | %.3f | ≤ %.2f: %s | %.3g | %.3g× |\n", m, worst[m], a.target, verdict, a.eager, a.eager/worst[m])
	}
	return b.String()
}

// originalNetworkSizes are the hidden sizes (keys h1, h2, values h1, h2) of
// the original work's networks.
func originalNetworkSizes(cfg *transformer.Config) [4]int {
	if cfg.Family == transformer.GPT2 {
		return [4]int{256, 64, 64, 128}
	}
	return [4]int{128, 128, 128, 128}
}

func benchRun(c *ucli.Context) error {
	// The kernel flags are checked before any model is built.
	if err := checkAlignKernel(c); err != nil {
		return err
	}
	if _, err := chosenDecodeKernel(c); err != nil {
		return err
	}
	be, dt, err := openBackend(c)
	if err != nil {
		return err
	}
	defer be.Close()
	var modes []transformer.Mode
	for _, name := range c.StringSlice("mode") {
		mode, err := transformer.ParseMode(name)
		if err != nil {
			return usageError{err}
		}
		modes = append(modes, mode)
	}
	var cells []benchCell
	out := c.App.Writer
	for _, name := range c.StringSlice("config") {
		cfgCells, err := benchConfig(c, be, dt, name, modes)
		if err != nil {
			return err
		}
		cells = append(cells, cfgCells...)
	}
	fmt.Fprintln(out, "\nmedian ms/token once the cache is full (batch 1, sampling on the device)")
	if path := c.String("json"); path != "" {
		b, _ := json.MarshalIndent(cells, "", "  ")
		if err := eval.WriteFileAtomic(path, append(b, '\n')); err != nil {
			return err
		}
	}
	return nil
}

// alignKernel describes how a Device's networks run: "f16 packed",
// "f32 packed" or "f32 unpacked".
func alignKernel(d *align.Device) string {
	if d.Packed() {
		return d.Precision().String() + " packed"
	}
	return d.Precision().String() + " unpacked"
}

func joinModes(modes []transformer.Mode, sep string) string {
	var s []string
	for _, m := range modes {
		s = append(s, m.String())
	}
	return strings.Join(s, sep)
}

// benchConfig times every mode and cache size of one config, printing a
// markdown table row per cache size as it goes.
func benchConfig(c *ucli.Context, be gpu.Backend, dt gpu.DType, name string, modes []transformer.Mode) ([]benchCell, error) {
	cfg, w, err := benchModel(name)
	if err != nil {
		return nil, err
	}
	m, err := transformer.NewModel(cfg, w, be, dt)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	h := originalNetworkSizes(cfg)
	pair := &align.Pair{
		Keys:   align.NewRandomNetwork(cfg.NLayer, cfg.NKV, cfg.HS, 256, h[0], h[1], 1),
		Values: align.NewRandomNetwork(cfg.NLayer, cfg.NKV, cfg.HS, 256, h[2], h[3], 2),
	}
	dev, err := uploadNetworks(c, pair, be, dt)
	if err != nil {
		return nil, err
	}
	defer dev.Close()
	kernel, err := chosenDecodeKernel(c)
	if err != nil {
		return nil, err
	}
	out := c.App.Writer
	fmt.Fprintf(out, "\n%s (%s weights, %s realignment networks, %s, decode kernel %s, LM head %s)\n\n| cache | %s |\n|---|%s\n", name, be.WeightDType(dt),
		alignKernel(dev), be.Name(), c.String("decode-kernel"), c.String("lm-head"), joinModes(modes, " | "), strings.Repeat("---|", len(modes)))
	var cells []benchCell
	for _, size := range c.IntSlice("cache-size") {
		fmt.Fprintf(out, "| %d |", size)
		for _, mode := range modes {
			s, err := transformer.NewStream(m, transformer.StreamOptions{Mode: mode, CacheSize: size, StartSize: 4, Realigner: dev, MaxBan: 1,
				DecodeKernel: kernel})
			if err != nil {
				return nil, usageError{err}
			}
			lat, err := eval.MeasureDecode(s, cfg.VocabSize, c.Int("warmup"), c.Int("steps"))
			s.Close()
			if err != nil {
				return nil, err
			}
			fmt.Fprintf(out, " %.3f |", eval.Ms(lat.Median))
			cell := benchCell{Config: name, Mode: mode.String(), CacheSize: size, MedianMs: eval.Ms(lat.Median),
				P10Ms: eval.Ms(lat.P10), P90Ms: eval.Ms(lat.P90), Device: be.Name(), DType: be.WeightDType(dt).String()}
			if mode == transformer.KVAlign {
				cell.AlignKernel = alignKernel(dev)
			}
			if a, ok := benchAnchors[name][cell.Mode]; ok {
				cell.TargetMs, cell.EagerMs = a.target, a.eager
			}
			cells = append(cells, cell)
		}
		fmt.Fprintln(out)
	}
	if t := anchorTable(name, cells); t != "" {
		fmt.Fprintf(out, "\n%s", t)
	}
	return cells, nil
}

// decodeKernel says how a stream's one-token steps run.
func decodeKernel(s *transformer.Stream) string {
	if s.Persistent() {
		return "persistent decode kernel"
	}
	return "one kernel per operation"
}
