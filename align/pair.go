package align

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// LoadPair reads the key and value networks named by spec: either
// "KEYS,VALUES" (two files) or a directory holding keys_network*.{pth,
// safetensors} and values_network* (with model, e.g. "distilgpt2", picking
// keys_network_distilgpt2.pth when several are present).
func LoadPair(spec, model string) (*Pair, error) {
	keys, values, err := pairFiles(spec, model)
	if err != nil {
		return nil, err
	}
	p := &Pair{}
	var km, vm *Meta
	if p.Keys, km, err = LoadNetwork(keys); err != nil {
		return nil, err
	}
	if p.Values, vm, err = LoadNetwork(values); err != nil {
		return nil, err
	}
	if km != nil {
		p.Meta = *km
	} else if vm != nil {
		p.Meta = *vm
	}
	k, v := p.Keys, p.Values
	if k.L != v.L || k.H != v.H || k.HS != v.HS {
		return nil, fmt.Errorf("key network %s (layers %d, heads %d, head size %d) and value network %s (layers %d, heads %d, head size %d) do not belong together",
			keys, k.L, k.H, k.HS, values, v.L, v.H, v.HS)
	}
	return p, nil
}

func pairFiles(spec, model string) (keys, values string, err error) {
	if k, v, ok := strings.Cut(spec, ","); ok {
		return k, v, nil
	}
	st, err := os.Stat(spec)
	if err != nil {
		return "", "", fmt.Errorf("realignment networks %s: %w", spec, err)
	}
	if !st.IsDir() {
		return "", "", fmt.Errorf("realignment networks %s: want a directory or KEYS,VALUES files", spec)
	}
	find := func(kind string) (string, error) {
		var found []string
		for _, ext := range []string{".safetensors", ".pth"} {
			if model != "" {
				if p := filepath.Join(spec, kind+"_network_"+model+ext); fileExists(p) {
					return p, nil
				}
			}
			m, _ := filepath.Glob(filepath.Join(spec, kind+"_network*"+ext))
			found = append(found, m...)
		}
		if len(found) == 1 {
			return found[0], nil
		}
		if len(found) == 0 {
			return "", fmt.Errorf("realignment networks: no %s_network*.{safetensors,pth} in %s", kind, spec)
		}
		return "", fmt.Errorf("realignment networks: several %s networks in %s (%s); name the model or give KEYS,VALUES files", kind, spec, strings.Join(found, ", "))
	}
	if keys, err = find("keys"); err != nil {
		return "", "", err
	}
	values, err = find("values")
	return keys, values, err
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// DefaultDirs are where networks for the known models are looked for when
// --align is not given: $KVALIGN_NETWORKS, the user's kvalign cache
// (~/.cache/kvalign/networks) and the original work's networks in the
// shared fixtures ($KVALIGN_SHARED/seed/networks).
func DefaultDirs() []string {
	var dirs []string
	if d := os.Getenv("KVALIGN_NETWORKS"); d != "" {
		dirs = append(dirs, d)
	}
	if c, err := os.UserCacheDir(); err == nil {
		dirs = append(dirs, filepath.Join(c, "kvalign", "networks"))
	}
	if s := os.Getenv("KVALIGN_SHARED"); s != "" {
		dirs = append(dirs, filepath.Join(s, "seed", "networks"))
	}
	return dirs
}

// FindDefault looks for the networks of a known model (its short name:
// "distilgpt2", "smollm2") in DefaultDirs; "" if none.
func FindDefault(model string) string {
	for _, d := range DefaultDirs() {
		for _, ext := range []string{".safetensors", ".pth"} {
			if fileExists(filepath.Join(d, "keys_network_"+model+ext)) && fileExists(filepath.Join(d, "values_network_"+model+ext)) {
				return d
			}
		}
	}
	return ""
}
