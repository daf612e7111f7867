# Fallback bash completion for docmail, used by packaging/build-deb only while
# "docmail generate complete-bash" does not exist.
_docmail() {
	local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}
	case $prev in
	--config|-o|render) COMPREPLY=($(compgen -f -- "$cur")); return ;;
	esac
	if [ "$COMP_CWORD" -eq 1 ]; then
		COMPREPLY=($(compgen -W "run check render queue retry remove submit --config --help --version" -- "$cur"))
	else
		COMPREPLY=($(compgen -W "--config --smtp --help" -- "$cur"))
	fi
}
complete -F _docmail docmail
