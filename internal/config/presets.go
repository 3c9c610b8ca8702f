package config

import (
	"fmt"
	"slices"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Preset is a curated list of rules shipped in the binary, used in a
// project's allow or deny list as `- preset: NAME`. Its rules are written
// in the config's own syntax and pass the same validation as hand-written
// ones (Rules parses them with the config parser).
type Preset struct {
	Name string
	// Version changes whenever the rules do (YYYY.N).
	Version     string
	Description string
	// Sources are the documents the rules were taken from.
	Sources []string
	// Body is the rules, as a YAML list in the config's syntax.
	Body string
}

// presets are the shipped presets, by name. Keep each rule's reason next
// to it; the sources say where the names come from.
var presets = []Preset{
	{
		Name: "pypi", Version: "2025.1", Description: "pip and uv installing from the Python Package Index",
		Sources: []string{
			"https://docs.pypi.org/api/index-api/ (the simple index at pypi.org/simple)",
			"https://warehouse.pypa.io/ (distribution files are served from files.pythonhosted.org)",
		},
		Body: `
- sni: pypi.org                # the index (simple API, JSON API)
- sni: files.pythonhosted.org  # wheels and sdists
`,
	},
	{
		Name: "npm", Version: "2025.1", Description: "npm, yarn and pnpm installing from the npm registry",
		Sources: []string{"https://docs.npmjs.com/cli/using-npm/config#registry (default https://registry.npmjs.org/)"},
		Body: `
- sni: registry.npmjs.org      # metadata and tarballs
`,
	},
	{
		Name: "crates", Version: "2025.1", Description: "cargo fetching from crates.io",
		Sources: []string{
			"https://doc.rust-lang.org/cargo/reference/registry-index.html (sparse index at index.crates.io)",
			"https://crates.io/config.json (dl: https://static.crates.io/crates)",
		},
		Body: `
- sni: index.crates.io         # the sparse index (cargo's default since 1.70)
- sni: static.crates.io        # crate downloads
- sni: crates.io               # the API (cargo search, publish)
`,
	},
	{
		Name: "go-modules", Version: "2025.1", Description: "the go command through the public module proxy and checksum database",
		Sources: []string{"https://go.dev/ref/mod#environment-variables (GOPROXY default https://proxy.golang.org,direct; GOSUMDB sum.golang.org)"},
		Body: `
- sni: proxy.golang.org        # module zips and .mod files
- sni: sum.golang.org          # the checksum database
`,
	},
	{
		Name: "rubygems", Version: "2025.1", Description: "gem and bundler installing from rubygems.org",
		Sources: []string{"https://guides.rubygems.org/rubygems-org-compact-index-api/ (index.rubygems.org)", "https://guides.rubygems.org/rubygems-org-api/"},
		Body: `
- sni: rubygems.org            # the API and gem downloads
- sni: index.rubygems.org      # bundler's compact index
`,
	},
	{
		Name: "maven-central", Version: "2025.1", Description: "Maven, Gradle and sbt fetching from Maven Central",
		Sources: []string{"https://maven.apache.org/guides/introduction/introduction-to-repositories.html (central: https://repo.maven.apache.org/maven2)"},
		Body: `
- sni: repo.maven.apache.org   # Maven's default central URL
- sni: repo1.maven.org         # Gradle's mavenCentral() and older tools
`,
	},
	{
		Name: "debian", Version: "2025.1", Description: "apt on Debian (deb.debian.org and security updates, over HTTP or HTTPS)",
		Sources: []string{"https://www.debian.org/mirror/list (deb.debian.org)", "https://www.debian.org/security/ (security.debian.org)"},
		Body: `
- http: deb.debian.org          # the default sources.list (plain HTTP; apt checks signatures)
- sni: deb.debian.org
- http: security.debian.org
- sni: security.debian.org
`,
	},
	{
		Name: "ubuntu", Version: "2025.1", Description: "apt on Ubuntu (the archive, its country mirrors, security and ports)",
		Sources: []string{"https://help.ubuntu.com/community/Repositories/Ubuntu", "the default /etc/apt/sources.list.d/ubuntu.sources"},
		Body: `
- http: archive.ubuntu.com
- http: "*.archive.ubuntu.com"  # country mirrors (us.archive.ubuntu.com, ...)
- http: security.ubuntu.com
- http: ports.ubuntu.com         # arm64 and other architectures
- sni: archive.ubuntu.com
- sni: security.ubuntu.com
- sni: ports.ubuntu.com
`,
	},
	{
		Name: "alpine", Version: "2025.1", Description: "apk on Alpine Linux",
		Sources: []string{"https://wiki.alpinelinux.org/wiki/Repositories (dl-cdn.alpinelinux.org)"},
		Body: `
- sni: dl-cdn.alpinelinux.org
- http: dl-cdn.alpinelinux.org
`,
	},
	{
		Name: "github", Version: "2025.2", Description: "github.com over HTTPS and git over SSH: git, the API, releases, raw files, packages",
		Sources: []string{
			"https://docs.github.com/en/authentication/keeping-your-account-and-data-secure/about-githubs-ip-addresses",
			"https://docs.github.com/en/authentication/connecting-to-github-with-ssh/using-ssh-over-the-https-port (git@github.com on port 22)",
			"https://api.github.com/meta (the domains section)",
		},
		Body: `
- sni: github.com                   # web and git over HTTPS
- sni: "*.github.com"               # api, codeload, uploads, objects
- sni: "*.githubusercontent.com"    # raw, objects (release assets), avatars
- sni: ghcr.io                      # GitHub Packages container registry
- tcp: github.com                   # git over SSH (git@github.com:owner/repo)
  ports: [22]
`,
	},
	{
		Name: "gitlab", Version: "2025.2", Description: "gitlab.com over HTTPS and git over SSH: git, the API, the container registry",
		Sources: []string{"https://docs.gitlab.com/user/gitlab_com/ (gitlab.com, registry.gitlab.com; SSH host keys of gitlab.com on port 22)"},
		Body: `
- sni: gitlab.com                   # web, API, git over HTTPS
- sni: registry.gitlab.com          # container registry
- sni: "*.gitlab-static.net"        # assets and package downloads
- tcp: gitlab.com                   # git over SSH (git@gitlab.com:group/project)
  ports: [22]
`,
	},
	{
		Name: "docker-hub", Version: "2025.1", Description: "pulling images from Docker Hub",
		Sources: []string{"https://docs.docker.com/desktop/setup/allow-list/"},
		Body: `
- sni: registry-1.docker.io                # the registry API
- sni: auth.docker.io                      # tokens
- sni: production.cloudflare.docker.com    # layer blobs
- sni: index.docker.io
`,
	},
	{
		Name: "huggingface", Version: "2025.1", Description: "the Hugging Face Hub (models, datasets, their large files)",
		Sources: []string{"https://huggingface.co/docs/huggingface_hub/guides/download", "https://huggingface.co/docs/hub/storage-backends (cdn-lfs, Xet)"},
		Body: `
- sni: huggingface.co
- sni: "*.huggingface.co"           # cdn-lfs and regional CDNs
- sni: "*.hf.co"                    # Xet storage (cas-server, cas-bridge)
`,
	},
	{
		Name: "openai", Version: "2025.1", Description: "the OpenAI API",
		Sources: []string{"https://platform.openai.com/docs/api-reference (https://api.openai.com/v1)"},
		Body: `
- sni: api.openai.com
`,
	},
	{
		Name: "anthropic", Version: "2025.1", Description: "the Anthropic API",
		Sources: []string{"https://docs.anthropic.com/en/api/overview (https://api.anthropic.com)"},
		Body: `
- sni: api.anthropic.com
`,
	},
	{
		Name: "gemini", Version: "2025.1", Description: "the Gemini API (Google AI Studio keys)",
		Sources: []string{"https://ai.google.dev/api (https://generativelanguage.googleapis.com)"},
		Body: `
- sni: generativelanguage.googleapis.com
`,
	},
	{
		Name: "mistral", Version: "2025.1", Description: "the Mistral AI API",
		Sources: []string{"https://docs.mistral.ai/api/ (https://api.mistral.ai)"},
		Body: `
- sni: api.mistral.ai
`,
	},
}

// LookupPreset returns the named preset.
func LookupPreset(name string) (Preset, bool) {
	i := slices.IndexFunc(presets, func(p Preset) bool { return p.Name == name })
	if i < 0 {
		return Preset{}, false
	}
	return presets[i], true
}

// Presets returns every shipped preset, sorted by name.
func Presets() []Preset {
	out := slices.Clone(presets)
	slices.SortFunc(out, func(a, b Preset) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// PresetNames lists the presets' names, sorted.
func PresetNames() []string {
	var out []string
	for _, p := range Presets() {
		out = append(out, p.Name)
	}
	return out
}

// Rules parses the preset's rules as entries of an allow or deny list,
// with the config parser's validation, each marked with the preset's name.
func (pr Preset) Rules(list string) ([]Rule, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal([]byte(pr.Body), &doc); err != nil {
		return nil, fmt.Errorf("reading its rules: %w", err)
	}
	if len(doc.Content) == 0 || doc.Content[0].Kind != yaml.SequenceNode {
		return nil, fmt.Errorf("its rules are not a list")
	}
	p := &parser{file: "preset:" + pr.Name, cfg: Default()}
	var out []Rule
	for _, e := range doc.Content[0].Content {
		if r, ok := p.rule(e, list); ok {
			r.Preset = pr.Name
			out = append(out, r)
		}
	}
	if len(p.issues) > 0 {
		return nil, (&Error{File: p.file, Issues: p.issues})
	}
	return out, nil
}
