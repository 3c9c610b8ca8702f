// Command vmegress is the vmegress daemon and CLI: host-level egress control
// for TAP-based microVMs (see README.md).
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/pprof"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/vmegress/vmegress/internal/config"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// Exit codes (DESIGN.md): 0 ok, 1 runtime failure, 2 usage or invalid config.
const (
	exitOK      = 0
	exitFailure = 1
	exitUsage   = 2
)

// usageError marks errors that exit 2.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// errSilent fails a command that already printed why.
var errSilent = errors.New("failed")

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

// app holds the global flags and the injected outputs.
type app struct {
	configPath string
	stateDir   string
	apiSocket  string
	stdout     io.Writer
	stderr     io.Writer
	log        *slog.Logger
}

func main() {
	// VMEGRESS_CPUPROFILE=FILE writes a CPU profile of this run (benchmarks).
	if path := os.Getenv("VMEGRESS_CPUPROFILE"); path != "" {
		if f, err := os.Create(path); err == nil {
			pprof.StartCPUProfile(f)
			defer pprof.StopCPUProfile()
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	pprof.StopCPUProfile()
	os.Exit(code)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	a := &app{stdout: stdout, stderr: stderr}
	a.log = slog.New(slog.NewJSONHandler(stderr, nil))
	root := a.rootCmd()
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return exitOK
	}
	if errors.Is(err, errSilent) {
		return exitFailure // the command printed its own report
	}
	if config.IsInvalid(err) {
		// Compiler style, one file:line:col: message per line.
		fmt.Fprintln(stderr, err)
		return exitUsage
	}
	fmt.Fprintln(stderr, "vmegress:", err)
	var ue usageError
	// cobra reports an unknown subcommand as a plain error.
	if errors.As(err, &ue) || strings.HasPrefix(err.Error(), "unknown command") {
		return exitUsage
	}
	return exitFailure
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func (a *app) rootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "vmegress",
		Short:         "Host-level egress control for microVMs (TPROXY + SNI allowlist)",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&a.configPath, "config", envOr("VMEGRESS_CONFIG", config.DefaultPath), "config file (env VMEGRESS_CONFIG)")
	root.PersistentFlags().StringVar(&a.stateDir, "state-dir", envOr("VMEGRESS_STATE_DIR", config.DefaultStateDir), "state directory (env VMEGRESS_STATE_DIR)")
	root.PersistentFlags().StringVar(&a.apiSocket, "api-socket", os.Getenv("VMEGRESS_API_SOCKET"), "the daemon's API socket (env VMEGRESS_API_SOCKET; default: the config's api_socket, "+config.DefaultAPISocket+")")
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	root.AddCommand(a.versionCmd(), a.runCmd(), a.upCmd(), a.downCmd(), a.policyCmd(), a.demoCmd(), a.statusCmd(), a.doctorCmd(), a.netCmd(), a.envoyCmd(), a.eventsCmd(), a.caCmd())
	a.addGen(root) // hidden `gen` (man pages, completions) and project-name completion
	// Unknown subcommands and bad arguments are usage errors.
	for _, c := range root.Commands() {
		wrapArgs(c)
	}
	return root
}

func wrapArgs(c *cobra.Command) {
	if c.Args != nil {
		orig := c.Args
		c.Args = func(cmd *cobra.Command, args []string) error {
			if err := orig(cmd, args); err != nil {
				return usageError{err}
			}
			return nil
		}
	}
	for _, sub := range c.Commands() {
		wrapArgs(sub)
	}
}

func (a *app) versionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fmt.Fprintf(a.stdout, "vmegress %s\n", version)
			return nil
		},
	}
}

func (a *app) loadConfig() (*config.Config, error) {
	cfg, err := config.Load(a.configPath)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, usagef("config file %s does not exist (set --config or VMEGRESS_CONFIG)", a.configPath)
		}
		return nil, err
	}
	return cfg, nil
}

func (a *app) policyCmd() *cobra.Command {
	pc := &cobra.Command{Use: "policy", Short: "Check and explain policy"}
	pc.AddCommand(a.explainCmd(), a.suggestCmd(), a.policySetCmd(), a.presetsCmd(), a.policyTestCmd(), a.policyDiffCmd())
	pc.AddCommand(&cobra.Command{
		Use:   "check [FILE]",
		Short: "Validate a config file (errors as file:line:col, exit 2)",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) == 1 {
				a.configPath = args[0]
			}
			cfg, err := a.loadConfig()
			if err != nil {
				return err
			}
			rules := 0
			for _, p := range cfg.Projects {
				rules += len(p.Allow) + len(p.Deny)
			}
			fmt.Fprintf(a.stdout, "%s: ok (%d projects, %d rules)\n", a.configPath, len(cfg.Projects), rules)
			for _, w := range cfg.Warnings() {
				fmt.Fprintf(a.stderr, "warning: %s\n", w)
			}
			return nil
		},
	})
	return pc
}
